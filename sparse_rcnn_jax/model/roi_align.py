"""Batched multi-level RoIAlign over FPN maps, with the official kernel's semantics.

Each box reads from one FPN level chosen by its size; there is no loop over boxes or images.
Two forms compute the same function (`impl`):

- "gather" (CPU and GPU; "auto" picks it there): every output bin is a weighted sum of the r*r*4 bilinear taps of
  its sample points, read from the box's own level by one gather per level (a box of another
  level reads with zero weights there). XLA fuses each gather into its weighted sum, so the
  [taps, C] rows are never written out, and the maps are never copied into one table (a
  concatenation of all levels per call cost more than the gathers). The gradient w.r.t. the maps
  (`jax.custom_vjp`) is one scatter-add of the weighted output gradient per level, straight
  into that level's map.
- "separable" (TPU, where gathers and scatters are slow; "auto" picks it there): the bilinear sampling is separable,
  so a box's output is Ay F Ax^T with per-box interpolation matrices Ay [R, H_l] and
  Ax [R, W_l] (zero rows for boxes of other levels): two batched matrix products per level,
  differentiated by JAX as matrix products. Its cost grows with the map size (about 22 GFLOP
  per image and stage on P2 at 800x1216, 100 boxes), so it suits matrix units, not a CPU; it
  has not been timed on a TPU here.

Semantics (detectron2 `ROIAlign(aligned=True)`, sampling ratio 2), per box on its level with
scale s = 1 / stride: the box spans x1*s - 0.5 .. x2*s - 0.5 (no minimum size); bins are
size / output_size; the sampling ratio gives ratio x ratio points per bin at
y = y1' + ph * bin_h + (iy + 0.5) * bin_h / ratio (likewise x). A point with y < -1, y > H,
x < -1 or x > W contributes 0; otherwise coordinates are clamped at 0 and a point at or past
the last row / column reads that row / column alone. A bin is the mean of its points. A box
with a NaN coordinate reads nothing.

Precision: boxes, sample coordinates and bilinear weights are float32 whatever the maps' dtype;
the weighted sums accumulate in float32 and the result has the maps' dtype.
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


IMPLS = ("auto", "gather", "separable")


def resolve_impl(impl: str, platform: str | None = None) -> str:
  """`impl` with "auto" made concrete for `platform` (default: jax's default backend):
  "separable" on TPU, "gather" elsewhere."""
  if impl != "auto":
    return impl
  return "separable" if (platform or jax.default_backend()) == "tpu" else "gather"


def _level_samples(boxes, levels, sizes, strides, output_size: int, sampling_ratio: int):
  """Bilinear taps along y and x of every box on its own level.

  Returns:
    (y_samples, x_samples), each the tuple of `_axis_samples` with [B, N, R*r] arrays.
  """
  heights = jnp.array([h for h, _ in sizes], jnp.int32)[levels]
  widths = jnp.array([w for _, w in sizes], jnp.int32)[levels]
  scale = jnp.array([1.0 / s for s in strides], boxes.dtype)[levels]
  x1, y1, x2, y2 = (boxes[..., i] * scale - 0.5 for i in range(4))
  return (_axis_samples(y1, y2, heights, output_size, sampling_ratio),
          _axis_samples(x1, x2, widths, output_size, sampling_ratio))


def _bin_taps(y_samples, x_samples, output_size: int, sampling_ratio: int):
  """The bilinear taps of each output bin: rows, cols (int32) and weights, each
  [B, N, R, R, r*r*4]; a weight is the tap's bilinear weight / r^2, 0 outside the window."""
  ylo, yhi, wy_lo, wy_hi, y_in = y_samples
  xlo, xhi, wx_lo, wx_hi, x_in = x_samples
  # Four corners of every (y, x) sample: [B, N, Sy, Sx, 4].
  rows = jnp.stack([ylo, ylo, yhi, yhi], axis=-1)[..., :, None, :]
  cols = jnp.stack([xlo, xhi, xlo, xhi], axis=-1)[..., None, :, :]
  wy = jnp.stack([wy_lo, wy_lo, wy_hi, wy_hi], axis=-1)[..., :, None, :]
  wx = jnp.stack([wx_lo, wx_hi, wx_lo, wx_hi], axis=-1)[..., None, :, :]
  inside = (y_in[..., :, None] & x_in[..., None, :])[..., None]
  weights = jnp.where(inside, wy * wx, 0.0) / sampling_ratio**2
  batch, num = weights.shape[:2]
  r, k = output_size, sampling_ratio

  def per_bin(x):
    """[B, N, R*r, R*r, 4] -> [B, N, R, R, r*r*4], taps of a bin last."""
    x = jnp.broadcast_to(x, (batch, num, r * k, r * k, 4)).reshape(batch, num, r, k, r, k, 4)
    return x.transpose(0, 1, 2, 4, 3, 5, 6).reshape(batch, num, r, r, k * k * 4)
  return per_bin(rows), per_bin(cols), per_bin(weights)


@jax.custom_vjp
def _pool_gather(maps, indices, weights):
  """Weighted sums of gathered rows, level by level.

  Args:
    maps: L maps [B * H_l * W_l, C] (rows of every image, image-major).
    indices: L int32 arrays [B, N, R, R, T]: the row of each tap in that level's map, or the
      map's row count (out of range) where the box is on another level.
    weights: [B, N, R, R, T] float32 tap weights.
  Returns:
    [B, N, R, R, C] in the maps' dtype: sum over taps of weight * row, accumulated in float32.
  """
  out = 0.0
  for table, index in zip(maps, indices):
    # A clipped gather with zero weights, not a filling one: XLA fuses the former into the
    # weighted sum, and writes every filled row out first for the latter. The sum over taps is
    # written out tap by tap: XLA fuses all the gathers into one elementwise loop over the
    # output, where a reduction over the taps axis ran 3-6x slower on CPU.
    on_level = index < table.shape[0]
    index = jnp.where(on_level, index, 0)
    level_weights = jnp.where(on_level, weights, 0.0)
    for tap in range(index.shape[-1]):
      row = jnp.take(table, index[..., tap], axis=0, mode="clip").astype(jnp.float32)
      out = out + row * level_weights[..., tap, None]
  return out.astype(maps[0].dtype)


def _pool_gather_fwd(maps, indices, weights):
  return _pool_gather(maps, indices, weights), (maps, indices, weights)


def _pool_gather_bwd(residuals, grad):
  maps, indices, weights = residuals
  grad_maps = []
  for table, index in zip(maps, indices):
    # Summed in float32: many taps land on one row of a coarse map.
    updates = weights[..., None] * grad[..., None, :].astype(jnp.float32)
    total = jnp.zeros(table.shape, jnp.float32).at[index].add(updates, mode="drop")
    grad_maps.append(total.astype(table.dtype))
  return (tuple(grad_maps), [None] * len(indices), jnp.zeros_like(weights))


_pool_gather.defvjp(_pool_gather_fwd, _pool_gather_bwd)


def _roi_align_gather(features, levels, y_samples, x_samples, output_size, sampling_ratio):
  rows, cols, weights = _bin_taps(y_samples, x_samples, output_size, sampling_ratio)
  batch = levels.shape[0]
  image = jnp.arange(batch, dtype=jnp.int32)[:, None, None, None, None]
  on_level = levels[..., None, None, None]
  tables, indices = [], []
  for level, f in enumerate(features):
    size = f.shape[1] * f.shape[2]
    index = image * size + rows * f.shape[2] + cols
    indices.append(jnp.where(on_level == level, index, batch * size))
    tables.append(f.reshape(batch * size, f.shape[-1]))
  return _pool_gather(tuple(tables), indices, weights)


def _interpolation_matrix(samples, length: int, output_size: int, sampling_ratio: int):
  """[B, N, R, length]: row p holds the mean over the bin's samples of their bilinear taps."""
  low, high, w_low, w_high, inside = samples
  w_low = jnp.where(inside, w_low, 0.0)
  w_high = jnp.where(inside, w_high, 0.0)
  taps = (jax.nn.one_hot(low, length, dtype=w_low.dtype) * w_low[..., None]
          + jax.nn.one_hot(high, length, dtype=w_low.dtype) * w_high[..., None])
  batch, num = low.shape[:2]
  taps = taps.reshape(batch, num, output_size, sampling_ratio, length)
  return taps.sum(axis=3) / sampling_ratio


def _roi_align_separable(features, levels, y_samples, x_samples, output_size, sampling_ratio):
  out = 0.0
  for level, f in enumerate(features):
    on_level = (levels == level)[..., None, None]
    ay = _interpolation_matrix(y_samples, f.shape[1], output_size, sampling_ratio)
    ax = _interpolation_matrix(x_samples, f.shape[2], output_size, sampling_ratio)
    # The matrices are rounded to the maps' dtype, the one place a bilinear weight is not
    # float32: bfloat16 operands are what the matrix units take; products accumulate in float32.
    ay = jnp.where(on_level, ay, 0.0).astype(f.dtype)
    ax = ax.astype(f.dtype)
    product = lambda spec, a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    # The shorter map axis stays in the intermediate: [B, N, min(H, W), R, C].
    if f.shape[1] <= f.shape[2]:
      inner = product("bnqx,byxc->bnyqc", ax, f).astype(f.dtype)
      out = out + product("bnpy,bnyqc->bnpqc", ay, inner)
    else:
      inner = product("bnpy,byxc->bnpxc", ay, f).astype(f.dtype)
      out = out + product("bnqx,bnpxc->bnpqc", ax, inner)
  return out.astype(features[0].dtype)


def multilevel_roi_align(features: Sequence[jax.Array], boxes: jax.Array, *,
                         levels: Sequence[int] = (2, 3, 4, 5), output_size: int = 7,
                         sampling_ratio: int = 2, canonical_box_size: float = 224.0,
                         canonical_level: int = 4, impl: str = "gather"):
  """RoIAlign of every box on its assigned FPN level.

  Args:
    features: L maps `[B, H_l, W_l, C]` (NHWC), finest first, one per entry of `levels`.
    boxes: [B, N, 4] absolute xyxy in input pixels. No gradient flows into them.
    levels: the pyramid level of each map, consecutive, fine to coarse; level l has stride
      2**l. The model passes its backbone's levels; the default, P2..P5, is for direct callers.
    output_size: pooled size R (7).
    sampling_ratio: samples per bin along each axis (2).
    impl: "gather", "separable" (see the module docstring; the same function) or "auto":
      separable on TPU, gather elsewhere.
  Returns:
    (roi_features [B, N, R, R, C], assigned [B, N] int32: each box's map, an index into
    `features`).
  """
  if impl not in IMPLS:
    raise ValueError(f"roi_align impl must be one of {IMPLS}, got {impl!r}.")
  if len(levels) != len(features):
    raise ValueError(f"{len(features)} feature maps but {len(levels)} levels {tuple(levels)}.")
  if tuple(levels) != tuple(range(levels[0], levels[0] + len(levels))):
    raise ValueError(f"RoIAlign levels must be consecutive, fine to coarse; got {tuple(levels)}.")
  boxes = jax.lax.stop_gradient(boxes).astype(jnp.float32)
  assigned = assign_levels(boxes, min_level=levels[0], max_level=levels[-1],
                           canonical_box_size=canonical_box_size,
                           canonical_level=canonical_level)
  sizes = [f.shape[1:3] for f in features]
  strides = [2**level for level in levels]
  y_samples, x_samples = _level_samples(boxes, assigned, sizes, strides, output_size,
                                        sampling_ratio)
  pool = _roi_align_gather if resolve_impl(impl) == "gather" else _roi_align_separable
  return pool(features, assigned, y_samples, x_samples, output_size, sampling_ratio), assigned
