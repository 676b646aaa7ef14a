"""The main job: train, evaluate with COCO AP, print the table and draw the detections.

Data flows one way: config -> dataset sources (data/pipeline.SOURCES) -> DatasetInfo (saved
in the workdir by the trainer) -> model -> train / evaluate. Nothing here writes into the config.
"""
import functools
import json
import logging
import pathlib

import jax
import ml_collections
import numpy as np

from sparse_rcnn_jax import detector
from sparse_rcnn_jax import evaluation
from sparse_rcnn_jax import inference
from sparse_rcnn_jax import metric_writer
from sparse_rcnn_jax import sharding
from sparse_rcnn_jax import trainer
from sparse_rcnn_jax import visualize
from sparse_rcnn_jax.data import info as info_lib
from sparse_rcnn_jax.data import pipeline

log = logging.getLogger(__name__)


def _eval_scalars(metrics: dict) -> dict:
  """The numbers of an evaluation, as logged to metrics.jsonl: {"eval/AP": ..., ...}."""
  return {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}


def draw_examples(predict_fn, variables, config, mesh, source, workdir: pathlib.Path,
                  size_divisibility: int, num_images: int = 4) -> list[pathlib.Path]:
  """Detections (score >= config.display_threshold, else the few best, dashed) and a Figure-4
  strip of per-stage boxes for a few eval images, drawn on the resized images the model saw,
  enlarged to a readable size (visualize.save_prediction)."""
  batch = next(iter(pipeline.eval_iterator(config.data, source,
                                           size_divisibility=size_divisibility)))
  dets = jax.device_get(predict_fn(variables, pipeline.make_global_batch(batch, mesh)))
  paths = []
  for i in np.flatnonzero(batch["valid"])[:num_images]:
    g = jax.process_index() * len(batch["valid"]) + i
    w, h = batch["image_whwh"][i, :2].astype(int)
    to_resized = np.tile(batch["image_whwh"][i, :2] / batch["orig_size"][i, ::-1], 2)
    paths += visualize.save_prediction(
        batch["image"][i, :h, :w], {k: v[g] for k, v in dets.items()}, source.class_names,
        workdir / f"detections_{i}", config.display_threshold, scale=to_resized)
  return paths


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                       evaluate: bool = True) -> dict | None:
  """Trains (resuming if possible), then evaluates on the eval split and draws pictures.

  Returns the final evaluation metrics, or None without an eval split.
  """
  workdir = pathlib.Path(workdir)
  evaluate = evaluate and pipeline.has_eval_split(config.data)
  mesh = sharding.make_mesh()
  eval_source = pipeline.load_source(config.data, "eval") if evaluate else None

  @functools.cache
  def model():
    """The model of the dataset info the trainer saved."""
    info = info_lib.DatasetInfo.load(workdir)
    return detector.build_model(config.model, info.num_classes)

  @functools.cache
  def predict_fn():
    """Built once per run: every evaluation reuses its compilation."""
    return inference.make_predict_fn(model(), mesh)

  def evaluate_fn(state, step):
    metrics = inference.evaluate_split(predict_fn(), state.eval_variables(), config, mesh,
                                       eval_source,
                                       size_divisibility=model().backbone.size_divisibility)
    log.info("step %d: AP %.4f AP50 %.4f", step, metrics["AP"], metrics["AP50"])
    return _eval_scalars(metrics)

  state = trainer.train(config, workdir, evaluate_fn if evaluate else None)
  # The final evaluation joins the curves, and metrics.png is drawn once more at the end.
  curves = metric_writer.MetricWriter(workdir, plot_every_s=None)
  if not evaluate:
    curves.plot()
    return None
  step, variables = int(state.step), state.eval_variables()
  metrics = inference.evaluate_split(predict_fn(), variables, config, mesh, eval_source,
                                     results_path=workdir / f"detections_step{step}.json",
                                     size_divisibility=model().backbone.size_divisibility)
  if jax.process_index() == 0:
    weights = ", the weights' moving average" if state.ema_params else ""
    print(f"\nCOCO evaluation at step {step} ({metrics['num_images']} images{weights}):")
    print(evaluation.format_table(metrics))
    (workdir / f"eval_step{step}.json").write_text(json.dumps(metrics, indent=1))
    curves.write(step, _eval_scalars(metrics))
    paths = draw_examples(predict_fn(), variables, config, mesh, eval_source, workdir,
                          model().backbone.size_divisibility)
    paths.append(curves.plot())
    print("Pictures: " + ", ".join(str(p) for p in paths if p is not None))
  return metrics
