"""A training run in its own process, for tests of devices, hosts, resume and signals.

  python tests/train_worker.py WORKDIR DATA_ROOT NUM_STEPS [--coordinator_address=...]
      [--num_processes=N --process_id=I] [--checkpoint_every=K] [--batch_size=B]

Trains configs/tiny.py on the synthetic set at DATA_ROOT (with --main_job, as train.py does:
training, evaluation, pictures) and writes WORKDIR/result.npz (losses per step, the final
parameters and their moving average and, with --digest_step, an earlier checkpoint's
parameters) from process 0.
"""
import pathlib
import sys

from absl import app
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_rcnn_jax import cli  # pylint: disable=g-import-not-at-top

_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 1000, "")
_BATCH = flags.DEFINE_integer("batch_size", 4, "")
_DIGEST_STEP = flags.DEFINE_integer(
    "digest_step", 0, "also digest the parameters of this step's checkpoint (0: none)")
_MAIN_JOB = flags.DEFINE_bool(
    "main_job", False, "run train.py's whole job (training, evaluation, pictures), then digest "
    "the final state")


def tiny_config(data_root: str, num_steps: int, batch_size: int, checkpoint_every: int):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  # One head stage: these runs test the training machinery, which a second stage only makes
  # slower to compile (stages are covered by the model's own tests).
  config.model.num_stages = 1
  config.data.source = "synthetic"
  config.data.synthetic = dict(root=data_root, num_train=16, num_val=4, image_size=64, seed=0)
  config.data.update(train_scales=(64,), max_size=64, test_scale=64, batch_size=batch_size,
                     eval_batch_size=batch_size, flip_prob=0.5)
  # With a moving average of the weights, so resuming is checked to restore it exactly.
  config.train.update(num_steps=num_steps, log_every=1, checkpoint_every=checkpoint_every,
                      keep_checkpoints=num_steps, ema_decay=0.9, ema_warmup_steps=4)
  return config


def main(argv):
  workdir, data_root, num_steps = argv[1], argv[2], int(argv[3])
  cli.setup_logging()
  cli.initialize_distributed()
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from sparse_rcnn_jax import experiment
  from sparse_rcnn_jax.training import metrics_file
  from sparse_rcnn_jax.data import info as info_lib
  config = tiny_config(data_root, num_steps, _BATCH.value, _CHECKPOINT_EVERY.value)
  if _MAIN_JOB.value:
    experiment.train_and_evaluate(config, workdir)
  # Resumes at the final step, so this only restores the final state (after the main job).
  state = experiment.train(config, workdir)
  digests = {"": state.params, "ema_": state.ema_params}
  if _DIGEST_STEP.value:
    from sparse_rcnn_jax import sharding
    from sparse_rcnn_jax.model import detector
    from sparse_rcnn_jax.training import model_state
    model = detector.build_model(config.model, info_lib.DatasetInfo.load(workdir).num_classes)
    variables, _ = model_state.restore_variables(model, config, workdir, sharding.make_mesh(),
                                                 step=_DIGEST_STEP.value, use_ema=False)
    digests["early_"] = variables["params"]
  if jax.process_index() == 0:
    records = metrics_file.read_metrics(pathlib.Path(workdir) / "metrics.jsonl")
    result = dict(steps=np.array([r["step"] for r in records]),
                  losses=np.array([r["loss"] for r in records]))
    for prefix, params in digests.items():
      leaves = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(params))]
      result[prefix + "param_sums"] = np.array([x.sum() for x in leaves])
      result[prefix + "param_abs"] = np.array([np.abs(x).sum() for x in leaves])
      result[prefix + "params"] = np.concatenate([x.ravel() for x in leaves])
    np.savez(pathlib.Path(workdir) / "result.npz", **result)


if __name__ == "__main__":
  app.run(main)
