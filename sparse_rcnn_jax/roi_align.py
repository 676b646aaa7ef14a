"""Batched multi-level RoIAlign over FPN maps, with the official kernel's semantics.

Each box reads from one FPN level chosen by its size. All levels are flattened into one
`[B, sum(H_l * W_l), C]` table and every box gathers only the 4 bilinear corners of its own
7x7x2x2 sample points from its own level, so memory scales with B * N * 49 * 4 * 4 gathered
rows, never with per-box copies of feature maps, and there is no loop over boxes or images.

Semantics (detectron2 `ROIAlign(aligned=True)`, sampling ratio 2), per box on its level with
scale s = 1 / stride: the box spans x1*s - 0.5 .. x2*s - 0.5 (no minimum size); bins are
size / output_size; the sampling ratio gives ratio x ratio points per bin at
y = y1' + ph * bin_h + (iy + 0.5) * bin_h / ratio (likewise x). A point with y < -1, y > H,
x < -1 or x > W contributes 0; otherwise coordinates are clamped at 0 and a point at or past
the last row / column reads that row / column alone. A bin is the mean of its points.
"""
from typing import Sequence

import jax
import jax.numpy as jnp


def assign_levels(boxes, *, min_level: int = 2, max_level: int = 5,
                  canonical_box_size: float = 224.0, canonical_level: int = 4):
  """FPN level of each box, as detectron2's `assign_boxes_to_levels`.

  Args:
    boxes: [..., 4] absolute xyxy in input pixels.
  Returns:
    [...] int32 level index relative to `min_level` (0 = P2 for min_level 2). Boxes with a
    negative or NaN area go to the finest level.
  """
  area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
  size = jnp.sqrt(jnp.maximum(area, 0.0))
  level = jnp.floor(canonical_level + jnp.log2(size / canonical_box_size + 1e-8))
  level = jnp.where(jnp.isnan(level), min_level, jnp.clip(level, min_level, max_level))
  return level.astype(jnp.int32) - min_level


def _axis_samples(start, end, length, output_size: int, sampling_ratio: int):
  """Bilinear taps along one axis for every box.

  Args:
    start, end: [...] box bounds in map coordinates (already scaled and offset).
    length: [...] int32 map size along this axis (H or W of the box's level).
  Returns:
    (low, high, w_low, w_high, inside), each [..., output_size * sampling_ratio]: the two
    neighbouring indices, their bilinear weights, and whether the sample lies within the
    kernel's [-1, length] window.
  """
  bin_size = (end - start) / output_size
  bins = jnp.arange(output_size, dtype=start.dtype)
  points = (jnp.arange(sampling_ratio, dtype=start.dtype) + 0.5)
  # Same operation order as the kernel: start + p * bin + (i + .5) * bin / ratio.
  coord = (start[..., None, None] + bins[:, None] * bin_size[..., None, None]
           + points[None, :] * bin_size[..., None, None] / sampling_ratio)
  coord = coord.reshape(coord.shape[:-2] + (output_size * sampling_ratio,))
  length = length[..., None]
  inside = (coord >= -1.0) & (coord <= length)
  coord = jnp.maximum(coord, 0.0)
  low = jnp.floor(coord)
  at_edge = low >= length - 1
  low = jnp.where(at_edge, length - 1, low)
  coord = jnp.where(at_edge, low, coord)
  frac = coord - low
  # NaN boxes: keep indices in range; their samples are masked out by `inside`.
  low = jnp.where(jnp.isnan(low), 0, low).astype(jnp.int32)
  high = jnp.where(at_edge, low, low + 1)
  return low, high, 1.0 - frac, frac, inside


def multilevel_roi_align(features: Sequence[jax.Array], boxes: jax.Array, *,
                         strides: Sequence[int] = (4, 8, 16, 32), output_size: int = 7,
                         sampling_ratio: int = 2, min_level: int = 2,
                         canonical_box_size: float = 224.0, canonical_level: int = 4):
  """RoIAlign of every box on its assigned FPN level.

  Args:
    features: L maps `[B, H_l, W_l, C]` (NHWC), finest first, with strides `strides`.
    boxes: [B, N, 4] absolute xyxy in input pixels. No gradient flows into them.
    strides: stride of each map; level l has scale 1 / strides[l].
    output_size: pooled size R (7).
    sampling_ratio: samples per bin along each axis (2).
    min_level: FPN level of `features[0]` (2 for P2).
  Returns:
    (roi_features [B, N, R, R, C], levels [B, N] int32 index into `features`).
  """
  boxes = jax.lax.stop_gradient(boxes)
  num_levels = len(features)
  batch, num_boxes = boxes.shape[:2]
  channels = features[0].shape[-1]
  levels = assign_levels(boxes, min_level=min_level, max_level=min_level + num_levels - 1,
                         canonical_box_size=canonical_box_size,
                         canonical_level=canonical_level)

  heights = jnp.array([f.shape[1] for f in features], jnp.int32)
  widths = jnp.array([f.shape[2] for f in features], jnp.int32)
  offsets = jnp.cumsum(jnp.array([0] + [f.shape[1] * f.shape[2] for f in features[:-1]]))
  scales = jnp.array([1.0 / s for s in strides], boxes.dtype)
  table = jnp.concatenate([f.reshape(batch, -1, channels) for f in features], axis=1)

  height, width = heights[levels], widths[levels]
  scale = scales[levels]
  x1, y1, x2, y2 = (boxes[..., i] * scale - 0.5 for i in range(4))
  ylo, yhi, wy_lo, wy_hi, y_in = _axis_samples(y1, y2, height, output_size, sampling_ratio)
  xlo, xhi, wx_lo, wx_hi, x_in = _axis_samples(x1, x2, width, output_size, sampling_ratio)

  # Four corners of every (y, x) sample: [B, N, Sy, Sx, 4].
  rows = jnp.stack([ylo, ylo, yhi, yhi], axis=-1)[..., :, None, :]
  cols = jnp.stack([xlo, xhi, xlo, xhi], axis=-1)[..., None, :, :]
  wy = jnp.stack([wy_lo, wy_lo, wy_hi, wy_hi], axis=-1)[..., :, None, :]
  wx = jnp.stack([wx_lo, wx_hi, wx_lo, wx_hi], axis=-1)[..., None, :, :]
  inside = (y_in[..., :, None] & x_in[..., None, :])[..., None]
  weights = jnp.where(inside, wy * wx, 0.0)
  index = offsets[levels][..., None, None, None] + rows * width[..., None, None, None] + cols

  samples = output_size * sampling_ratio
  gathered = jax.vmap(lambda t, i: jnp.take(t, i.reshape(-1), axis=0, mode="clip"))(
      table, index.reshape(batch, -1))
  gathered = gathered.reshape(batch, num_boxes, samples, samples, 4, channels)
  values = jnp.einsum("bnyxk,bnyxkc->bnyxc", weights.astype(table.dtype), gathered)
  values = values.reshape(batch, num_boxes, output_size, sampling_ratio, output_size,
                          sampling_ratio, channels)
  return values.mean(axis=(3, 5)), levels
