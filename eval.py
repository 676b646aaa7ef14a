"""Evaluates a trained Sparse R-CNN on the config's eval split with COCO AP.

  python eval.py --config configs/synthetic.py --workdir workdirs/synthetic
  python eval.py --config configs/r50_100pro_3x.py --checkpoint model_final.pth   # official

With --workdir the newest checkpoint there (or --step) is evaluated; --checkpoint takes an
official Sparse R-CNN checkpoint (.pth or .npz). Writes the COCO detections json and the
metrics next to the checkpoint (or to --out) and prints the AP table with per-class AP.
"""
import json
import pathlib

from absl import app
from absl import flags
from ml_collections import config_flags

from sparse_rcnn_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "An official Sparse R-CNN checkpoint (.pth / .npz).")
_OUT = flags.DEFINE_string("out", None, "Where to write results (default: the workdir).")


def main(argv):
  del argv
  cli.setup_logging()
  if bool(_WORKDIR.value) == bool(_CHECKPOINT.value):
    raise app.UsageError("Give exactly one of --workdir or --checkpoint.")
  cli.initialize_distributed()
  # pylint: disable=g-import-not-at-top
  import jax
  from sparse_rcnn_jax import detector, evaluation, experiment, inference, sharding, trainer
  from sparse_rcnn_jax.convert import checkpoint_io, official
  from sparse_rcnn_jax.data import pipeline
  from sparse_rcnn_jax.head_config import HeadConfig

  config = _CONFIG.value
  experiment.prepare_data(config)
  source = pipeline.load_source(config.data, "eval")
  trainer.match_dataset(config, source)
  mesh = sharding.make_mesh()
  if _CHECKPOINT.value:
    state = checkpoint_io.load_state_dict(_CHECKPOINT.value)
    variables = official.from_official(state, HeadConfig.from_config(config.model),
                                       config.model.backbone.depth)
    variables, name = jax.device_put(variables, sharding.replicated(mesh)), "official"
    out = pathlib.Path(_OUT.value or pathlib.Path(_CHECKPOINT.value).parent)
  else:
    variables, step = trainer.restore_variables(config, _WORKDIR.value, mesh, _STEP.value)
    name, out = f"step{step}", pathlib.Path(_OUT.value or _WORKDIR.value)
  out.mkdir(parents=True, exist_ok=True)
  model = detector.build_model(config.model)
  metrics = inference.evaluate_split(model, variables, config, mesh, source,
                                     results_path=out / f"detections_{name}.json")
  if jax.process_index() == 0:
    print(evaluation.format_table(metrics))
    (out / f"eval_{name}.json").write_text(json.dumps(metrics, indent=1))
    print(f"Wrote {out / f'detections_{name}.json'} and {out / f'eval_{name}.json'}")


if __name__ == "__main__":
  app.run(main)
