"""Evaluates a trained Sparse R-CNN on the eval split with COCO AP.

  python eval.py --workdir workdirs/synthetic                 # the run's own config and data
  python eval.py --config workdirs/synthetic/config.py --workdir workdirs/synthetic \
      --config.data.eval_ann=moved/val.json --config.data.eval_images=moved/images
  python eval.py --config configs/r50_100pro_3x.py --checkpoint model_final.pth   # official
  python eval.py --workdir workdirs/bccd --tta        # test-time augmentation (config.tta)
  python eval.py --workdir workdirs/bccd --stages     # the AP of every head stage

With --workdir the newest checkpoint there (or --step) is evaluated, with the config the run
saved there unless --config is given; --checkpoint takes an official Sparse R-CNN checkpoint
(.pth or .npz) and needs --config. A run that kept a moving average of its weights
(train.ema_decay > 0) is evaluated with it; --use_ema=false evaluates the trained weights
(files named ..._raw). Writes the COCO detections json and the metrics next to the
checkpoint (or to --out) and prints the AP table with per-class AP. --tta evaluates with
the official test-time augmentation (several scales, mirrored, merged by soft voting:
sparse_rcnn_jax/evaluation/tta.py) and names its files ..._tta. --stages prints the AP of
every head stage's predictions from one pass (the paper's Table 7 from one trained model) and
writes eval_..._stages.json; config.model.eval_stages=k makes every inference stop after
stage k.
"""
import json
import pathlib

from absl import app
from absl import flags

from sparse_rcnn_jax import cli

_RUN = cli.define_run_flags()
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "An official Sparse R-CNN checkpoint (.pth / .npz).")
_OUT = flags.DEFINE_string("out", None, "Where to write results (default: the workdir).")
_TTA = flags.DEFINE_bool("tta", False, "Evaluate with test-time augmentation (config.tta).")
_STAGES = flags.DEFINE_bool("stages", False, "Print the COCO AP of every head stage's "
                            "predictions, from one pass (the paper's Table 7 from one model).")


def main(argv):
  del argv
  cli.setup_logging()
  if bool(_RUN.workdir.value) == bool(_CHECKPOINT.value):
    raise app.UsageError("Give exactly one of --workdir or --checkpoint.")
  if _CHECKPOINT.value and _RUN.config.value is None:
    raise app.UsageError("--checkpoint needs --config (the recipe of the checkpoint).")
  cli.initialize_distributed()
  # pylint: disable=g-import-not-at-top
  import jax
  from sparse_rcnn_jax.model import detector
  from sparse_rcnn_jax.evaluation import coco_eval, inference, tta
  from sparse_rcnn_jax.training import model_state
  from sparse_rcnn_jax import sharding
  from sparse_rcnn_jax.data import pipeline

  mesh = sharding.make_mesh()
  if _CHECKPOINT.value:
    config = _RUN.config.value
    source = pipeline.load_source(config.data, "eval")
    info, model = source.info, detector.build_model(config.model, source.num_classes)
    variables, head, depth = model_state.official_variables(_CHECKPOINT.value, model.head)
    if (head, depth) != (model.head, config.model.backbone.depth):
      raise app.UsageError(
          f"{_CHECKPOINT.value} holds a ResNet-{depth} and the head {head}; --config builds a "
          f"ResNet-{config.model.backbone.depth} and the head {model.head}.")
    variables, name = jax.device_put(variables, sharding.replicated(mesh)), "official"
    out = pathlib.Path(_OUT.value or pathlib.Path(_CHECKPOINT.value).parent)
  else:
    try:
      run = _RUN.load(mesh)
    except (FileNotFoundError, ValueError) as error:
      raise app.UsageError(str(error)) from error
    config, info, model, variables = run.config, run.info, run.model, run.variables
    source = pipeline.load_source(config.data, "eval")
    name = f"step{run.step}{'_raw' if run.ema_kept and not run.ema else ''}"
    out = pathlib.Path(_OUT.value or _RUN.workdir.value)
  if source.info != info:
    raise app.UsageError(f"The eval split's classes {source.class_names} are not the model's "
                         f"{info.class_names}.")
  out.mkdir(parents=True, exist_ok=True)
  if _STAGES.value:
    if _TTA.value:
      raise app.UsageError("--stages evaluates without test-time augmentation; drop --tta.")
    per_stage = inference.evaluate_stages(inference.make_stages_predict_fn(model, mesh),
                                          variables, config, mesh, source,
                                          size_divisibility=model.backbone.size_divisibility)
    if jax.process_index() == 0:
      print(coco_eval.format_stages_table(per_stage))
      (out / f"eval_{name}_stages.json").write_text(json.dumps(per_stage, indent=1))
      print(f"Wrote {out / f'eval_{name}_stages.json'}")
    return
  if _TTA.value:
    name, evaluate = f"{name}_tta", tta.evaluate_split
    predict_fn = tta.make_predict_fn(model, mesh, tta.TtaSettings.from_config(config).flip)
  else:
    predict_fn, evaluate = inference.make_predict_fn(model, mesh), inference.evaluate_split
  metrics = evaluate(predict_fn, variables, config, mesh, source,
                     results_path=out / f"detections_{name}.json",
                     size_divisibility=model.backbone.size_divisibility)
  if jax.process_index() == 0:
    print(coco_eval.format_table(metrics))
    (out / f"eval_{name}.json").write_text(json.dumps(metrics, indent=1))
    print(f"Wrote {out / f'detections_{name}.json'} and {out / f'eval_{name}.json'}")


if __name__ == "__main__":
  app.run(main)
