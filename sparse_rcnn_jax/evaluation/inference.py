"""Inference over a dataset split on the mesh, and its COCO evaluation.

Batches are split over the mesh's "data" axis like training; detections are gathered to
every host, so every host runs COCOeval on the same detections (and returns the same metrics)
while the lead host alone writes the results file.
"""
import logging
from typing import Callable, Iterable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sparse_rcnn_jax import device_batches
from sparse_rcnn_jax import sharding
from sparse_rcnn_jax import xla_cpu
from sparse_rcnn_jax.data import pipeline
from sparse_rcnn_jax.evaluation import coco_eval
from sparse_rcnn_jax.evaluation import postprocess

log = logging.getLogger(__name__)


def jit_on_mesh(predict: Callable, mesh) -> Callable:
  """jit of predict(variables, batch): the variables replicated, the batch and the outputs
  split over the mesh's "data" axis, with this machine's compiler options."""
  return jax.jit(predict, in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
                 out_shardings=sharding.batch_sharded(mesh),
                 compiler_options=xla_cpu.compiler_options())


def make_predict_fn(model, mesh, num_detections: int | None = None) -> Callable:
  """jit(variables, batch) -> detections (postprocess.postprocess) of the last stage.

  The batch holds "image", "image_whwh" and "orig_size" as in data/batching.py. Also returns
  "stage_boxes" [B, S + 1, N, 4]: the proposal boxes then each stage's boxes, in original-image
  pixels (not clipped), and "stage_scores" [B, S, N]: each stage's highest class probability
  per proposal, for pictures like the paper's Figure 4.
  """
  def predict(variables, batch):
    out = model.apply(variables, batch["image"], batch["image_whwh"])
    dets = postprocess.postprocess(out["pred_logits"][-1], out["pred_boxes"][-1],
                                   batch["image_whwh"], batch["orig_size"], num_detections)
    boxes = jax.numpy.concatenate([out["proposal_boxes"][None], out["pred_boxes"]])
    scale = (batch["orig_size"][:, ::-1] / batch["image_whwh"][:, :2]).astype(boxes.dtype)
    dets["stage_boxes"] = jax.numpy.moveaxis(boxes, 0, 1) * jax.numpy.tile(scale, 2)[:, None,
                                                                                  None]
    dets["stage_scores"] = jax.nn.sigmoid(out["pred_logits"]).max(-1).swapaxes(0, 1)
    return dets
  return jit_on_mesh(predict, mesh)


def _gather(tree):
  """Batch-sharded global arrays, or host-local NumPy batches, -> the whole batch as NumPy
  on every host (hosts in process order, as the global batch is assembled)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


# make_predict_fn's outputs that a picture of one image needs (visualize.save_prediction).
PICTURE_KEYS = ("boxes", "scores", "labels", "valid", "stage_boxes", "stage_scores")


def gathered_predictions(predict_fn, variables, batches: Iterable[dict], mesh,
                         keys: Sequence[str],
                         batch_keys: Sequence[str] = ("image_id", "valid", "orig_size")
                         ) -> Iterator[tuple[dict, dict]]:
  """Runs `predict_fn` on each host-local batch on every host; yields (its outputs named in
  `keys`, the host batch's `batch_keys`), each the whole global batch as NumPy on every host."""
  for batch in batches:
    dets = predict_fn(variables, device_batches.make_global_batch(batch, mesh))
    yield _gather({k: dets[k] for k in keys}), _gather({k: batch[k] for k in batch_keys})


def predict_dataset(predict_fn, variables, batches: Iterable[dict], mesh,
                    category_ids) -> list[dict]:
  """COCO-format detections for every valid image of `batches` (host-local batches)."""
  results = []
  for dets, local in gathered_predictions(predict_fn, variables, batches, mesh,
                                          ("boxes", "scores", "labels", "valid")):
    valid = np.asarray(dets["valid"]) & np.asarray(local["valid"])[:, None]
    results += coco_eval.detections_to_coco(local["image_id"], dets["boxes"], dets["scores"],
                                             dets["labels"], valid, category_ids)
  return results


def _eval_batches(config: ml_collections.ConfigDict, source, size_divisibility: int):
  """This host's eval batches of `source`, skipped images reported at the end."""
  return pipeline.SkipReport(source, "eval").follow(
      pipeline.eval_iterator(config.data, source, jax.process_index(), jax.process_count(),
                             size_divisibility=size_divisibility))


def evaluate_split(predict_fn, variables, config: ml_collections.ConfigDict, mesh,
                   source, results_path=None, *, size_divisibility: int) -> dict:
  """Runs `predict_fn` (make_predict_fn's, built once per run and reused) on every image of
  the eval `source`, padded to multiples of `size_divisibility` (the model's backbone's), and
  evaluates the detections with COCOeval.

  Returns the metrics of coco_eval.evaluate (AP, AP50, ..., per-class AP). The lead host
  writes the detections to `results_path` if given.
  """
  results = predict_dataset(predict_fn, variables, _eval_batches(config, source,
                                                                 size_divisibility),
                            mesh, source.category_ids)
  if results_path is not None and jax.process_index() == 0:
    coco_eval.write_results(results, results_path)
  return coco_eval.evaluate(source.coco_gt(), results, class_names=source.class_names,
                             max_dets=max(100, config.model.num_proposals))


STAGE_KEYS = ("boxes", "scores", "labels", "valid")


def make_stages_predict_fn(model, mesh) -> Callable:
  """jit(variables, batch) -> the detections (postprocess.postprocess) of every stage the
  model runs: "boxes" [B, S, K, 4], "scores", "labels" and "valid" [B, S, K] (stage axis
  second, so that the batch stays split over the mesh's data axis)."""
  def predict(variables, batch):
    out = model.apply(variables, batch["image"], batch["image_whwh"])
    per_stage = jax.vmap(postprocess.postprocess, in_axes=(0, 0, None, None))(
        out["pred_logits"], out["pred_boxes"], batch["image_whwh"], batch["orig_size"])
    return {k: jax.numpy.moveaxis(per_stage[k], 0, 1) for k in STAGE_KEYS}
  return jit_on_mesh(predict, mesh)


def evaluate_stages(predict_fn, variables, config: ml_collections.ConfigDict, mesh, source,
                    *, size_divisibility: int) -> list[dict]:
  """COCO metrics (coco_eval.evaluate) of each stage's detections, stage 1 first, from one
  pass of `predict_fn` (make_stages_predict_fn's) over the eval `source`: the paper's Table 7
  from one trained model. The last stage's equal `evaluate_split`'s."""
  results: list[list[dict]] = []
  for dets, local in gathered_predictions(predict_fn, variables,
                                          _eval_batches(config, source, size_divisibility),
                                          mesh, STAGE_KEYS):
    valid = np.asarray(dets["valid"]) & np.asarray(local["valid"])[:, None, None]
    stages = valid.shape[1]
    results += [[] for _ in range(stages - len(results))]
    for s in range(stages):
      results[s] += coco_eval.detections_to_coco(
          local["image_id"], dets["boxes"][:, s], dets["scores"][:, s], dets["labels"][:, s],
          valid[:, s], source.category_ids)
  gt = source.coco_gt()
  return [coco_eval.evaluate(gt, stage_results, class_names=source.class_names,
                             max_dets=max(100, config.model.num_proposals))
          for stage_results in results]
