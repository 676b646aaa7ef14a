"""What the command-line programs share: logging and the multi-host flags.

Importing this module defines the flags --coordinator_address, --num_processes, --process_id.
"""
import logging

from absl import flags
from absl import logging as absl_logging

from sparse_rcnn_jax import sharding

COORDINATOR = flags.DEFINE_string("coordinator_address", "",
                                  "Multi-host: HOST:PORT of process 0.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Multi-host: number of processes.")
PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Multi-host: this process's index.")


def setup_logging() -> None:
  """Our progress messages at INFO on stderr; library chatter (orbax, absl) at WARNING."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  package = logging.getLogger("sparse_rcnn_jax")
  package.setLevel(logging.INFO)
  package.addHandler(handler)
  package.propagate = False


def initialize_distributed() -> None:
  """jax.distributed from the flags (a no-op for a single process)."""
  sharding.initialize_distributed(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
