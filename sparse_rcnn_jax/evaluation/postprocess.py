"""Inference postprocessing (docs/model.md, section 6): top-k over all proposal-class scores.

Per image, as the official inference: the sigmoid scores [N, C] of the last stage are flattened
to N * C entries (entry p * C + c is proposal p, class c) and the k highest are kept, in
descending order, equal scores in increasing entry order; label = entry mod C, proposal =
entry div C, box = that proposal's box. Boxes are scaled from the resized image (whwh) to the
original one, x by orig_w / w and y by orig_h / h, then clipped to [0, orig_w] x [0, orig_h].
No NMS and no score threshold: every one of the k detections goes to evaluation. Shapes stay
static for jit; detections that the official code drops (zero width or height after clipping)
are kept in place with `valid = False`.
"""
import jax
import jax.numpy as jnp


def top_k(pred_logits, pred_boxes, k: int):
  """The k highest of the N * C sigmoid scores (module docstring), boxes as they are.

  Args:
    pred_logits: [B, N, C] class logits; pred_boxes: [B, N, 4] absolute xyxy.
  Returns:
    scores [B, k] descending, labels [B, k] int32, boxes [B, k, 4] (pred_boxes' pixels, not
    clipped), proposal [B, k] int32.
  """
  batch, num, num_classes = pred_logits.shape
  scores, index = jax.lax.top_k(jax.nn.sigmoid(pred_logits).reshape(batch, num * num_classes), k)
  # The entries are >= 0, so lax.div (truncating) is the floor division and the label is what
  # remains; one integer division instead of jnp's floor_divide and mod, whose sign handling
  # ONNX converters turn into more operations.
  proposal = jax.lax.div(index, jnp.int32(num_classes)).astype(jnp.int32)
  labels = (index - proposal * num_classes).astype(jnp.int32)
  boxes = jnp.take_along_axis(pred_boxes, proposal[..., None], axis=1)
  return scores, labels, boxes, proposal


def postprocess(pred_logits, pred_boxes, image_whwh, orig_size, num_detections: int | None = None):
  """Turns the last stage's outputs into detections in original-image pixels.

  Args:
    pred_logits: [B, N, C] class logits of the last stage.
    pred_boxes: [B, N, 4] absolute xyxy boxes in input (resized) pixels.
    image_whwh: [B, 4] (w, h, w, h) of each resized, unpadded image.
    orig_size: [B, 2] (h, w) of each original image.
    num_detections: k; defaults to N.
  Returns:
    dict of "scores" [B, k] (descending), "labels" [B, k] int32 (0..C-1), "boxes" [B, k, 4]
    xyxy in original-image pixels clipped to the image, "proposal_index" [B, k] int32, and
    "valid" [B, k] bool (False for boxes empty after clipping).
  """
  k = pred_logits.shape[1] if num_detections is None else num_detections
  scores, labels, boxes, proposal = top_k(pred_logits, pred_boxes, k)
  orig_h = orig_size[:, 0].astype(boxes.dtype)
  orig_w = orig_size[:, 1].astype(boxes.dtype)
  scale = jnp.stack([orig_w / image_whwh[:, 0], orig_h / image_whwh[:, 1]] * 2, axis=-1)
  boxes = boxes * scale[:, None, :]
  limit = jnp.stack([orig_w, orig_h] * 2, axis=-1)[:, None, :]
  boxes = jnp.clip(boxes, 0.0, limit)
  valid = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
  return {"scores": scores, "labels": labels, "boxes": boxes, "proposal_index": proposal,
          "valid": valid}
