"""The main job: train, evaluate with COCO AP, print the table and draw the detections.

`config.data.source = "synthetic"` uses the embedded dataset (data/synthetic.py): it is
generated under `config.data.synthetic.root` (deterministic from its seed, reused when
present) and then read as the COCO-format folder it is.
"""
import dataclasses
import json
import logging
import pathlib

import jax
import ml_collections
import numpy as np

from sparse_rcnn_jax import detector
from sparse_rcnn_jax import evaluation
from sparse_rcnn_jax import inference
from sparse_rcnn_jax import sharding
from sparse_rcnn_jax import trainer
from sparse_rcnn_jax import visualize
from sparse_rcnn_jax.data import pipeline
from sparse_rcnn_jax.data import synthetic

log = logging.getLogger(__name__)


def prepare_data(config: ml_collections.ConfigDict) -> None:
  """Resolves `data.source = "synthetic"` into the COCO folder it generates (in place)."""
  data = config.data
  if data.source != "synthetic":
    return
  # Every field but `root` is a generator argument (SyntheticConfig): the set's size, image
  # size, seed and difficulty (objects per image, object scales, occlusion) are config data.
  params = dict(data.synthetic)
  root = params.pop("root")
  known = [f.name for f in dataclasses.fields(synthetic.SyntheticConfig)]
  unknown = sorted(set(params) - set(known))
  if unknown:
    raise ValueError(f"config.data.synthetic has unknown fields {unknown}; the generator "
                     f"takes {known}")
  paths = synthetic.generate(root, **params)
  data.source = "coco"
  data.train_ann, data.train_images = map(str, paths.split("train"))
  data.eval_ann, data.eval_images = map(str, paths.split("val"))


def has_eval_split(config: ml_collections.ConfigDict) -> bool:
  data = config.data
  return bool(data.eval_ann) if data.source == "coco" else bool(data.tfds_name)


def _variables(state) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


def draw_examples(model, variables, config, mesh, source, workdir: pathlib.Path,
                  num_images: int = 4) -> list[pathlib.Path]:
  """Detections (score >= config.display_threshold) and a Figure-4 strip of per-stage boxes
  for a few eval images, drawn on the resized images the model saw."""
  predict_fn = inference.make_predict_fn(model, mesh)
  batch = next(iter(pipeline.eval_iterator(config.data, source)))
  dets = jax.device_get(predict_fn(variables, pipeline.make_global_batch(batch, mesh)))
  paths = []
  for i in np.flatnonzero(batch["valid"])[:num_images]:
    g = jax.process_index() * len(batch["valid"]) + i
    w, h = batch["image_whwh"][i, :2].astype(int)
    image = batch["image"][i, :h, :w]
    to_resized = np.tile(batch["image_whwh"][i, :2] / batch["orig_size"][i, ::-1], 2)
    keep = dets["valid"][g]
    picture = visualize.draw_detections(image, dets["boxes"][g][keep] * to_resized,
                                        dets["scores"][g][keep], dets["labels"][g][keep],
                                        source.class_names,
                                        score_threshold=config.display_threshold)
    paths.append(visualize.save_png(picture, workdir / f"detections_{i}.png"))
    scores = np.concatenate([np.ones((1, dets["stage_scores"].shape[-1])),
                             dets["stage_scores"][g]])
    strip = visualize.draw_stages(image, dets["stage_boxes"][g] * to_resized, scores,
                                  score_threshold=config.display_threshold)
    paths.append(visualize.save_png(strip, workdir / f"stages_{i}.png"))
  return paths


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                       evaluate: bool = True) -> dict | None:
  """Trains (resuming if possible), then evaluates on the eval split and draws pictures.

  Returns the final evaluation metrics, or None without an eval split.
  """
  workdir = pathlib.Path(workdir)
  prepare_data(config)
  evaluate = evaluate and has_eval_split(config)
  mesh = sharding.make_mesh()
  eval_source = pipeline.load_source(config.data, "eval") if evaluate else None

  def evaluate_fn(state, step):
    model = detector.build_model(config.model)
    metrics = inference.evaluate_split(model, _variables(state), config, mesh, eval_source)
    log.info("step %d: AP %.4f AP50 %.4f", step, metrics["AP"], metrics["AP50"])
    return {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}

  state = trainer.train(config, workdir, evaluate_fn if evaluate else None)
  if not evaluate:
    return None
  model = detector.build_model(config.model)
  step = int(state.step)
  metrics = inference.evaluate_split(model, _variables(state), config, mesh, eval_source,
                                     results_path=workdir / f"detections_step{step}.json")
  if jax.process_index() == 0:
    print(f"\nCOCO evaluation at step {step} ({metrics['num_images']} images):")
    print(evaluation.format_table(metrics))
    (workdir / f"eval_step{step}.json").write_text(json.dumps(metrics, indent=1))
    paths = draw_examples(model, _variables(state), config, mesh, eval_source, workdir)
    print("Pictures: " + ", ".join(str(p) for p in paths))
  return metrics
