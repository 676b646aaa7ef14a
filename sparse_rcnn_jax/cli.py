"""What the command-line programs share: logging, the multi-host flags and the flags that
name a trained run.

Importing this module defines the flags --coordinator_address, --num_processes, --process_id;
`define_run_flags` defines --config, --workdir, --step and --use_ema for the programs that read
a trained run (eval.py, predict.py, export.py).
"""
import dataclasses
import logging

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

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


@dataclasses.dataclass(frozen=True)
class RunFlags:
  """The flags that name a trained run, its checkpoint and weights (`define_run_flags`)."""
  config: flags.FlagHolder
  workdir: flags.FlagHolder
  step: flags.FlagHolder
  use_ema: flags.FlagHolder

  def load(self, mesh=None, **kwargs):
    """model_state.load_run of these flags (kwargs: its mesh and build_model)."""
    from sparse_rcnn_jax.training import model_state  # pylint: disable=g-import-not-at-top
    return model_state.load_run(self.workdir.value, self.config.value, step=self.step.value,
                                use_ema=self.use_ema.value, mesh=mesh, **kwargs)


def define_run_flags() -> RunFlags:
  """Defines --config, --workdir, --step and --use_ema (once per program, at import)."""
  return RunFlags(
      config=config_flags.DEFINE_config_file(
          "config", None, "Experiment config file (default: the one saved in --workdir); the "
          "checkpoint's own optimizer and moving-average settings are kept.", lock_config=False),
      workdir=flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/."),
      step=flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest)."),
      use_ema=flags.DEFINE_bool(
          "use_ema", True, "Use the moving average of the weights when the run kept one "
          "(train.ema_decay > 0); false: the trained weights themselves."))
