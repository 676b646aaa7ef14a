"""Devices, hosts and the mesh: one code path for one CPU, many devices and many hosts.

The mesh has a "data" axis over every device of every host: the batch is split along it and
parameters are replicated. A "model" axis can be added to MESH_AXES later (with parameter
shardings that name it) without touching the training step, which only speaks of shardings.
"""
import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
MESH_AXES = (DATA_AXIS,)


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
  """Joins a multi-host run; a no-op for one process.

  With an address, the run spans `num_processes` processes and this is `process_id`. Without
  one, JAX auto-detects cluster environments it knows (SLURM, Cloud TPU, ...); if none is
  found this stays a single-process run.
  """
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return
  try:
    jax.distributed.initialize()
  except ValueError as error:
    # JAX says exactly this when no cluster it knows of (SLURM, Cloud TPU, ...) is detected:
    # a single-process run. Any other failure (a detected cluster misconfigured) is raised.
    if "coordinator_address should be defined" not in str(error):
      raise


def make_mesh(devices=None) -> Mesh:
  """A 1-D "data" mesh over `devices` (default: all devices of all hosts), in jax.devices()'
  order (each process's devices together, as global batches are assembled).

  Not jax.make_mesh: in this JAX its axes default to Explicit (shardings carried in the types);
  this code is written and tested with Auto axes, which Mesh(...) gives.
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))
