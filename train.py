"""Trains Sparse R-CNN from a config; resumes automatically from the workdir.

  python train.py --config configs/synthetic.py --workdir workdirs/synthetic
  python train.py --config configs/r50_100pro_3x.py --workdir workdirs/r50 \
      --config.model.num_proposals=300 --config.data.batch_size=32

Multi-host: run the same command on every host with --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (or let JAX detect SLURM / Cloud TPU environments).
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from sparse_rcnn_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and results go here.")
_EVAL = flags.DEFINE_bool("eval", True, "Evaluate at eval_every steps and at the end, "
                          "if the config names an evaluation split.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  cli.setup_logging()
  cli.initialize_distributed()
  # Imported after jax.distributed is initialized.
  from sparse_rcnn_jax import experiment  # pylint: disable=g-import-not-at-top
  experiment.train_and_evaluate(_CONFIG.value, _WORKDIR.value, evaluate=_EVAL.value)


if __name__ == "__main__":
  app.run(main)
