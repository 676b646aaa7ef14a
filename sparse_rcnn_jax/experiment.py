"""The main job: train, evaluate with COCO AP, print the table and draw the detections.

A run is assembled here once (`assemble`): the sources are loaded, the dataset info is saved
in the workdir and the model is built for its classes; the trainer, every evaluation and the
pictures are handed these same objects. Data flows one way: config -> dataset sources
(data/pipeline.SOURCES) -> DatasetInfo -> model -> train / evaluate / draw. Nothing here
writes into the config. Every host runs the same code: predictions are gathered to every host,
and process 0 alone prints and writes files.
"""
import dataclasses
import functools
import itertools
import json
import logging
import pathlib

import jax
import ml_collections
import numpy as np

from sparse_rcnn_jax import run_files
from sparse_rcnn_jax import sharding
from sparse_rcnn_jax.data import info as info_lib
from sparse_rcnn_jax.data import pipeline
from sparse_rcnn_jax.data import source as source_lib
from sparse_rcnn_jax.evaluation import coco_eval
from sparse_rcnn_jax.evaluation import inference
from sparse_rcnn_jax.evaluation import visualize
from sparse_rcnn_jax.model import detector
from sparse_rcnn_jax.training import metric_writer
from sparse_rcnn_jax.training import trainer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Run:
  """A training run's parts, built once by `assemble`.

  Attributes:
    info: the classes of the training split (saved in the workdir).
    model: the detector for those classes.
    train_source: the training split.
    eval_source: the evaluation split, or None when the run does not evaluate.
  """
  info: info_lib.DatasetInfo
  model: detector.SparseRCNN
  train_source: source_lib.DetectionSource
  eval_source: source_lib.DetectionSource | None


def assemble(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
             evaluate: bool = True) -> Run:
  """Loads the sources named by `config.data` (the eval split when `evaluate` and the config
  names one), writes the config and dataset info to `workdir` (process 0; run_files.py) and
  builds the model.

  Raises:
    DataError: the eval split's classes are not the training split's.
  """
  train_source = pipeline.load_source(config.data, "train")
  info = train_source.info
  eval_source = None
  if evaluate and pipeline.has_eval_split(config.data):
    eval_source = pipeline.load_source(config.data, "eval")
    if eval_source.info != info:
      raise source_lib.DataError(
          f"The eval split's classes {eval_source.class_names} (category ids "
          f"{eval_source.category_ids}) are not the training split's "
          f"{info.class_names} (category ids {info.category_ids}): evaluation would misname "
          "every detection. Give both splits the same categories.")
  if jax.process_index() == 0:
    run_files.save(workdir, config, info)
  return Run(info, detector.build_model(config.model, info.num_classes), train_source,
             eval_source)


def _eval_scalars(metrics: dict) -> dict:
  """The numbers of an evaluation, as logged to metrics.jsonl: {"eval/AP": ..., ...}."""
  return {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}


def draw_examples(predict_fn, variables, config, mesh, source: source_lib.DetectionSource,
                  workdir: pathlib.Path, size_divisibility: int,
                  num_images: int = 4) -> list[pathlib.Path]:
  """Detections (score >= config.display_threshold, else the few best, dashed) and a Figure-4
  strip of per-stage boxes for the first images of the eval split's first batch, drawn on the
  original images (visualize.save_prediction).

  Every host predicts its share of the batch and receives all of it
  (inference.gathered_predictions); process 0 decodes the originals and writes the pictures.
  Returns their paths (none elsewhere).
  """
  batches = itertools.islice(
      pipeline.eval_iterator(config.data, source, jax.process_index(), jax.process_count(),
                             size_divisibility=size_divisibility), 1)
  dets, local = next(inference.gathered_predictions(
      predict_fn, variables, batches, mesh, inference.PICTURE_KEYS, ("valid", "source_index")))
  if jax.process_index() != 0:
    return []
  paths = []
  for i in np.flatnonzero(local["valid"])[:num_images]:
    image = source.example(int(local["source_index"][i])).image
    paths += visualize.save_prediction(image, {k: v[i] for k, v in dets.items()},
                                       source.class_names, workdir / f"detections_{i}",
                                       config.display_threshold)
  return paths


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path):
  """Assembles a run and trains it (resuming if possible) without evaluating; returns the
  final model_state.TrainState."""
  run = assemble(config, workdir, evaluate=False)
  return trainer.train(config, workdir, run.model, run.train_source)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                       evaluate: bool = True) -> dict | None:
  """Trains (resuming if possible), then evaluates on the eval split and draws pictures.

  Returns the final evaluation metrics, or None without an eval split.
  """
  workdir = pathlib.Path(workdir)
  run = assemble(config, workdir, evaluate)
  mesh = sharding.make_mesh()
  multiple = run.model.backbone.size_divisibility

  @functools.cache
  def predict_fn():
    """Built once per run: every evaluation reuses its compilation."""
    return inference.make_predict_fn(run.model, mesh)

  def evaluate_split(variables, results_path=None):
    return inference.evaluate_split(predict_fn(), variables, config, mesh, run.eval_source,
                                    results_path, size_divisibility=multiple)

  def evaluate_fn(state, step):
    metrics = evaluate_split(state.eval_variables())
    log.info("step %d: AP %.4f AP50 %.4f", step, metrics["AP"], metrics["AP50"])
    return _eval_scalars(metrics)

  state = trainer.train(config, workdir, run.model, run.train_source,
                        evaluate_fn if run.eval_source is not None else None, mesh)
  # The final evaluation joins the curves, and metrics.png is drawn once more at the end.
  curves = metric_writer.MetricWriter(workdir, plot_every_s=None)
  if run.eval_source is None:
    curves.plot()
    return None
  step, variables = int(state.step), state.eval_variables()
  metrics = evaluate_split(variables, workdir / f"detections_step{step}.json")
  curves.write(step, _eval_scalars(metrics))
  paths = draw_examples(predict_fn(), variables, config, mesh, run.eval_source, workdir,
                        multiple)
  if jax.process_index() == 0:
    weights = ", the weights' moving average" if state.ema_params else ""
    print(f"\nCOCO evaluation at step {step} ({metrics['num_images']} images{weights}):")
    print(coco_eval.format_table(metrics))
    (workdir / f"eval_step{step}.json").write_text(json.dumps(metrics, indent=1))
    paths.append(curves.plot())
    print("Pictures: " + ", ".join(str(p) for p in paths if p is not None))
  return metrics
