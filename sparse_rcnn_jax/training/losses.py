"""The set-prediction loss of Sparse R-CNN (docs/model.md, section 5), deeply supervised.

Each stage's predictions are matched to the ground truth on their own (matcher.py); the loss
of a stage is a sigmoid focal loss over all B*N*C logits plus L1 and GIoU losses on the
matched pairs, each divided by num_boxes and weighted; the total sums over stages.

The matcher is config.loss.matcher: "scipy" (the default, solved on the host through one
callback per device) or "device" (solved inside the compiled step); matcher.py says when to
choose which. In a traced program the loss's ops sit under the name scope
"set_prediction_loss", and the costs and the matching under "set_prediction_loss/matching".

One code path for one device and a data-parallel mesh: the loss is written on the global
batch (the jit partitions it), and only the matching runs per device (matcher.get_matcher).
The official code computes, on each of D devices, its local sum / num_boxes with
num_boxes = max(global GT count / D, 1), and averages gradients over devices; the global-batch
equivalent is (global sum) / (D * num_boxes), which is what `set_prediction_loss` returns.
It equals the single-device loss whenever the batch holds at least D boxes.
"""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from sparse_rcnn_jax.model import box_ops
from sparse_rcnn_jax.training import matcher as matcher_lib

TERMS = ("loss_ce", "loss_bbox", "loss_giou")

# Stands in for both boxes of an unmatched slot, so padding contributes exactly 0 and no
# gradient (even from a NaN prediction gathered there). NumPy: no device work at import.
_UNIT_BOX = np.array([0.0, 0.0, 1.0, 1.0], np.float32)


def sigmoid_focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
  """Elementwise sigmoid focal loss (Lin et al. 2017), as fvcore's sigmoid_focal_loss.

  Ours rather than optax.losses.sigmoid_focal_loss: optax computes (1 - p_t) in log space (a
  logsumexp over the logits stacked twice), a different rounding from the official code's
  fvcore form that the reference tests compare against, and twice the memory over all
  B * N * C logits of every stage.

  Args:
    logits: [...] raw logits.
    targets: [...] 0/1 targets, same shape.
  Returns:
    [...] alpha_t * (1 - p_t)^gamma * BCE(logits, targets).
  """
  prob = jax.nn.sigmoid(logits)
  ce = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  p_t = prob * targets + (1 - prob) * (1 - targets)
  alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
  return alpha_t * (1 - p_t) ** gamma * ce


def num_boxes_per_device(gt_mask, num_devices: int = 1):
  """num_boxes: ground-truth boxes of the global batch / data-parallel devices, at least 1.

  Args:
    gt_mask: [B, M] bool over the global batch (under jit on a mesh, the sum is a psum).
  """
  return jnp.maximum(jnp.sum(gt_mask).astype(jnp.float32) / num_devices, 1.0)


def matched_targets(pred_index, match_mask, gt_labels, num_proposals: int, num_classes: int):
  """One-hot class targets per proposal from the per-slot assignment.

  Args:
    pred_index: [..., M] proposal matched to each ground-truth slot.
    match_mask: [..., M] bool.
    gt_labels: [..., M] int classes.
  Returns:
    [..., N, C] float: 1 at (matched proposal, its class), 0 elsewhere.
  """
  assigned = (pred_index[..., None, :] == jnp.arange(num_proposals)[:, None]) \
      & match_mask[..., None, :]
  one_hot = jax.nn.one_hot(gt_labels, num_classes, dtype=jnp.float32)
  return jnp.einsum("...nm,...mc->...nc", assigned.astype(jnp.float32), one_hot)


def stage_loss_sums(pred_logits, pred_boxes, gt_boxes, gt_labels, image_whwh, pred_index,
                    match_mask, *, focal_alpha: float, focal_gamma: float):
  """Unnormalized loss sums of each stage.

  Args:
    pred_logits: [S, B, N, C]; pred_boxes: [S, B, N, 4] absolute xyxy.
    gt_boxes: [B, M, 4] absolute xyxy; gt_labels: [B, M]; image_whwh: [B, 4].
    pred_index, match_mask: [S, B, M], the matching of each stage.
  Returns:
    dict of [S] sums: "loss_ce" (focal over all B*N*C logits), "loss_bbox" (L1 of matched
    boxes / whwh), "loss_giou" (1 - GIoU of matched pairs).
  """
  targets = matched_targets(pred_index, match_mask, gt_labels, pred_logits.shape[-2],
                            pred_logits.shape[-1])
  focal = sigmoid_focal_loss(pred_logits, targets, focal_alpha, focal_gamma)

  valid = match_mask[..., None]
  matched = jnp.take_along_axis(pred_boxes, pred_index[..., None], axis=-2)
  src = jnp.where(valid, matched, _UNIT_BOX)
  tgt = jnp.where(valid, gt_boxes, _UNIT_BOX)
  whwh = image_whwh[:, None, :]
  l1 = jnp.where(valid, jnp.abs(src / whwh - tgt / whwh), 0.0)
  giou = jnp.where(match_mask, 1.0 - box_ops.elementwise_generalized_iou(src, tgt), 0.0)
  return {"loss_ce": jnp.sum(focal, axis=(1, 2, 3)), "loss_bbox": jnp.sum(l1, axis=(1, 2, 3)),
          "loss_giou": jnp.sum(giou, axis=(1, 2))}


def _data_parallel(mesh: Mesh | None, axis: str) -> int:
  if mesh is None:
    return 1
  if axis not in mesh.shape:
    raise ValueError(f"The mesh has axes {tuple(mesh.shape)}; the loss splits the batch "
                     f"over {axis!r}.")
  return mesh.shape[axis]


def _match(pred_logits, pred_boxes, gt_boxes, gt_labels, image_whwh, gt_mask, config,
           mesh: Mesh | None, data_axis: str):
  """The matching costs of every stage and image, and the matcher's assignment.

  Args:
    pred_logits: [S, B, N, C]; pred_boxes: [S, B, N, 4] absolute xyxy.
    gt_boxes: [B, M, 4]; gt_labels, gt_mask: [B, M]; image_whwh: [B, 4].
  Returns:
    costs [B, S, N, M] (batch-major, so the matcher's batch axis is the one split over
    devices) and pred_index, match_mask [S, B, M].
  """
  costs = matcher_lib.match_costs(
      jnp.swapaxes(pred_logits, 0, 1), jnp.swapaxes(pred_boxes, 0, 1), gt_boxes[:, None],
      gt_labels[:, None], image_whwh[:, None], class_weight=config.class_weight,
      l1_weight=config.l1_weight, giou_weight=config.giou_weight,
      focal_alpha=config.focal_alpha, focal_gamma=config.focal_gamma)
  stage_mask = jnp.broadcast_to(gt_mask[:, None], costs.shape[:2] + gt_mask.shape[-1:])
  match = matcher_lib.get_matcher(config.matcher, mesh, data_axis)
  pred_index, match_mask = (jnp.swapaxes(x, 0, 1) for x in match(costs, stage_mask))
  return costs, pred_index, match_mask


def _weighted(sums: dict, config, denominator) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The total weighted loss and every term of every stage, from the [S] sums."""
  weights = {"loss_ce": config.class_weight, "loss_bbox": config.l1_weight,
             "loss_giou": config.giou_weight}
  metrics, total = {}, 0.0
  for term in TERMS:
    per_stage = sums[term] / denominator
    for s in range(per_stage.shape[0]):
      metrics[f"{term}_{s}"] = per_stage[s]
      metrics[f"weighted_{term}_{s}"] = weights[term] * per_stage[s]
    total = total + weights[term] * jnp.sum(per_stage)
  return total, metrics


def set_prediction_loss(pred_logits, pred_boxes, targets: dict, config: Any, *,
                        mesh: Mesh | None = None, data_axis: str = "data"
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The weighted training loss summed over stages, and every term for logging.

  Args:
    pred_logits: [S, B, N, C] raw logits of every stage.
    pred_boxes: [S, B, N, 4] absolute xyxy in input pixels.
    targets: the batch dict with "gt_boxes" [B, M, 4] absolute xyxy, "gt_labels" [B, M] int,
      "gt_mask" [B, M] bool and "image_whwh" [B, 4] of the unpadded images.
    config: config.loss: class_weight, l1_weight, giou_weight, focal_alpha, focal_gamma and
      matcher (a key of matcher.MATCHERS).
    mesh: the data-parallel mesh when the batch is split over `data_axis`; the matching then
      runs on each device's own images, whichever the matcher. None on one device.
  Returns:
    total: scalar, sum over stages and terms of weight * term.
    metrics: "loss_ce_{s}", "loss_bbox_{s}", "loss_giou_{s}" (unweighted, s = 0..S-1),
      "weighted_loss_ce_{s}" etc., "num_boxes" and "num_nonfinite_costs" (cost entries of real
      ground truth that were NaN or infinite; such pairs are matched only as a last resort).
  """
  with jax.named_scope("set_prediction_loss"):
    gt_boxes = targets["gt_boxes"].astype(jnp.float32)
    gt_labels, gt_mask = targets["gt_labels"], targets["gt_mask"]
    image_whwh = targets["image_whwh"].astype(jnp.float32)
    num_devices = _data_parallel(mesh, data_axis)
    with jax.named_scope("matching"):
      costs, pred_index, match_mask = _match(pred_logits, pred_boxes, gt_boxes, gt_labels,
                                             image_whwh, gt_mask, config, mesh, data_axis)
    sums = stage_loss_sums(pred_logits, pred_boxes, gt_boxes, gt_labels, image_whwh,
                           pred_index, match_mask, focal_alpha=config.focal_alpha,
                           focal_gamma=config.focal_gamma)
    num_boxes = num_boxes_per_device(gt_mask, num_devices)
    total, metrics = _weighted(sums, config, num_devices * num_boxes)
    metrics["num_boxes"] = num_boxes
    metrics["num_nonfinite_costs"] = jnp.sum(
        ~jnp.isfinite(costs) & gt_mask[:, None, None, :]).astype(jnp.float32)
    return total, metrics
