"""sharding.initialize_distributed: one process without a cluster, every real error raised."""
import os
import subprocess
import sys

import jax
import pytest

from sparse_rcnn_jax import sharding


def test_no_cluster_is_one_process_and_other_errors_are_raised(monkeypatch):
  calls = []

  def initialize(**kwargs):
    calls.append(kwargs)
    raise error

  monkeypatch.setattr(jax.distributed, "initialize", initialize)
  # What this JAX raises outside any cluster it can detect (checked below on the real one).
  error = ValueError("coordinator_address should be defined.")
  sharding.initialize_distributed()
  error = ValueError("Number of processes must be defined.")
  with pytest.raises(ValueError, match="Number of processes"):
    sharding.initialize_distributed()
  error = RuntimeError("Connection refused")
  with pytest.raises(RuntimeError):
    sharding.initialize_distributed()
  assert len(calls) == 3


def test_jax_says_what_initialize_distributed_expects_outside_a_cluster():
  """The message the no-cluster case is recognized by: if a JAX release changes it, this
  fails rather than every single-process run."""
  code = ("import jax\ntry:\n  jax.distributed.initialize()\nexcept ValueError as e:\n"
          "  print(e)\n")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "TPU", "OMPI"))}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, check=True, env=dict(env, JAX_PLATFORMS="cpu")).stdout
  assert "coordinator_address should be defined" in out
