"""Box geometry shared by the head, the loss and postprocessing.

Conventions: `xyxy` is (x1, y1, x2, y2) and `cxcywh` is (centre x, centre y, width, height), in
the last axis. Functions accept any leading shape `[..., 4]`. They never assert on box validity:
degenerate (zero-size) and inverted boxes give finite values, and NaN inputs give NaN outputs
rather than plausible numbers, so a caller can detect them.
"""
import math

import jax.numpy as jnp

# The official head's delta weights (wx, wy, ww, wh) and the clamp on dw, dh.
BBOX_WEIGHTS = (2.0, 2.0, 1.0, 1.0)
SCALE_CLAMP = math.log(100000.0 / 16)


def cxcywh_to_xyxy(boxes):
  """[..., 4] (cx, cy, w, h) -> [..., 4] (x1, y1, x2, y2)."""
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def area(boxes):
  """[..., 4] xyxy -> [...] area; inverted or empty boxes have area 0."""
  return (jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0) *
          jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0))


def _safe_divide(num, den):
  """num / den, but 0 where den <= 0; finite gradients either way (the double-where trick).

  A NaN denominator counts as usable so that NaN propagates instead of turning into 0.
  """
  ok = ~(den <= 0)
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def pairwise_iou_and_union(boxes1, boxes2):
  """IoU and union area of every pair.

  Args:
    boxes1: [..., N, 4] xyxy.
    boxes2: [..., M, 4] xyxy.
  Returns:
    (iou [..., N, M], union [..., N, M]).
  """
  area1 = area(boxes1)[..., :, None]
  area2 = area(boxes2)[..., None, :]
  lt = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
  rb = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = area1 + area2 - inter
  return _safe_divide(inter, union), union


def pairwise_generalized_iou(boxes1, boxes2):
  """Generalized IoU (Rezatofighi et al. 2019) of every pair, in [-1, 1].

  Args:
    boxes1: [..., N, 4] xyxy.
    boxes2: [..., M, 4] xyxy.
  Returns:
    [..., N, M]. Equal to the official `generalized_box_iou` on valid boxes; degenerate and
    inverted boxes (treated as empty) give finite values instead of an assertion.
  """
  iou, union = pairwise_iou_and_union(boxes1, boxes2)
  lt = jnp.minimum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
  rb = jnp.maximum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  enclosing = wh[..., 0] * wh[..., 1]
  return iou - _safe_divide(enclosing - union, enclosing)


def elementwise_generalized_iou(boxes1, boxes2):
  """GIoU of matched pairs: boxes1 [..., 4], boxes2 [..., 4] xyxy -> [...]."""
  return pairwise_generalized_iou(boxes1[..., None, :], boxes2[..., None, :])[..., 0, 0]


def apply_deltas(deltas, boxes, weights=BBOX_WEIGHTS, scale_clamp=SCALE_CLAMP):
  """Decodes regression deltas relative to boxes, as the official head does.

  Args:
    deltas: [..., 4] (dx, dy, dw, dh).
    boxes: [..., 4] absolute xyxy reference boxes.
    weights: (wx, wy, ww, wh) dividing the deltas.
    scale_clamp: upper bound on dw and dh before exp.
  Returns:
    [..., 4] absolute xyxy boxes (not clipped).
  """
  widths = boxes[..., 2] - boxes[..., 0]
  heights = boxes[..., 3] - boxes[..., 1]
  ctr_x = boxes[..., 0] + 0.5 * widths
  ctr_y = boxes[..., 1] + 0.5 * heights
  wx, wy, ww, wh = weights
  dx = deltas[..., 0] / wx
  dy = deltas[..., 1] / wy
  dw = jnp.minimum(deltas[..., 2] / ww, scale_clamp)
  dh = jnp.minimum(deltas[..., 3] / wh, scale_clamp)
  pred_ctr_x = dx * widths + ctr_x
  pred_ctr_y = dy * heights + ctr_y
  pred_w = jnp.exp(dw) * widths
  pred_h = jnp.exp(dh) * heights
  return jnp.stack([pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                    pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h], axis=-1)
