"""RoIAlign against a plain-Python transcription of detectron2's ROIAlign CPU kernel."""
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_rcnn_jax import xla_cpu
from sparse_rcnn_jax.model import roi_align

STRIDES = (4, 8, 16, 32)


def _bilinear(fmap, y, x):
  """detectron2 roi_align bilinear_interpolate on fmap [H, W, C] (a scalar loop reference)."""
  height, width = fmap.shape[:2]
  if y < -1.0 or y > height or x < -1.0 or x > width:
    return np.zeros(fmap.shape[-1]), []
  y, x = max(y, 0.0), max(x, 0.0)
  y_low, x_low = int(y), int(x)
  if y_low >= height - 1:
    y_high = y_low = height - 1
    y = float(y_low)
  else:
    y_high = y_low + 1
  if x_low >= width - 1:
    x_high = x_low = width - 1
    x = float(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  hy, hx = 1.0 - ly, 1.0 - lx
  taps = [(y_low, x_low, hy * hx), (y_low, x_high, hy * lx),
          (y_high, x_low, ly * hx), (y_high, x_high, ly * lx)]
  return sum(w * fmap[r, c] for r, c, w in taps), taps


def reference_roi_align(fmap, box, scale, out=7, ratio=2):
  """One box on one map [H, W, C] -> ([out, out, C], taps for the gradient)."""
  x1, y1, x2, y2 = (float(v) * scale - 0.5 for v in box)
  bin_h, bin_w = (y2 - y1) / out, (x2 - x1) / out
  result = np.zeros((out, out, fmap.shape[-1]))
  taps = {}
  for ph in range(out):
    for pw in range(out):
      acc = np.zeros(fmap.shape[-1])
      for iy in range(ratio):
        y = y1 + ph * bin_h + (iy + 0.5) * bin_h / ratio
        for ix in range(ratio):
          x = x1 + pw * bin_w + (ix + 0.5) * bin_w / ratio
          value, tap = _bilinear(fmap, y, x)
          acc += value
          taps.setdefault((ph, pw), []).extend(tap)
      result[ph, pw] = acc / (ratio * ratio)
  return result, taps


def reference_level(box, min_level=2, max_level=5):
  area = (box[2] - box[0]) * (box[3] - box[1])
  level = math.floor(4 + math.log2(math.sqrt(max(area, 0.0)) / 224 + 1e-8))
  return min(max(level, min_level), max_level) - min_level


def _features(rng, batch=2, channels=3, height=64, width=96):
  return [rng.standard_normal((batch, height // s, width // s, channels)).astype(np.float32)
          for s in STRIDES]


def _boxes(rng):
  """Boxes of every kind: inside, crossing and outside the map, degenerate, on all levels."""
  image = [
      [10, 12, 30, 40],            # small, inside: P2
      [0, 0, 96, 64],              # whole image
      [-20, -10, 40, 30],          # crossing the top-left border
      [80, 50, 130, 90],           # crossing the bottom-right border
      [200, 200, 260, 240],        # entirely outside
      [33.3, 20.7, 33.3, 20.7],    # zero size
      [50, 40, 20, 10],            # inverted
      [5, 5, 5.5, 60],             # very thin
      [-300, -300, 400, 300],      # huge: P5
      [0, 0, 120, 120],            # P3
      [0, 0, 250, 250],            # P4
      [95.5, 63.5, 96.2, 64.4],    # at the last row and column
  ]
  extra = rng.uniform(-20, 110, size=(4, 4))
  extra[:, 2:] = extra[:, :2] + rng.uniform(1, 300, size=(4, 2))
  boxes = np.array(image + extra.tolist(), np.float32)
  return np.stack([boxes, boxes[::-1] + 1.5])


def test_levels_match_detectron2_formula():
  rng = np.random.default_rng(0)
  boxes = _boxes(rng)
  levels = np.asarray(roi_align.assign_levels(jnp.asarray(boxes)))
  expected = np.array([[reference_level(b) for b in img] for img in boxes.astype(np.float64)])
  np.testing.assert_array_equal(levels, expected)
  assert set(levels.ravel()) == {0, 1, 2, 3}


FORMS = ("gather", "separable")


@pytest.mark.parametrize("impl", FORMS)
@pytest.mark.parametrize("height,width", [(64, 96), (96, 64)])
def test_forward_matches_kernel_loop(impl, height, width):
  rng = np.random.default_rng(1)
  feats = _features(rng, height=height, width=width)
  boxes = _boxes(rng)
  out, levels = jax.jit(functools.partial(roi_align.multilevel_roi_align, impl=impl))(
      [jnp.asarray(f) for f in feats], jnp.asarray(boxes))
  out = np.asarray(out)
  assert out.shape == (2, boxes.shape[1], 7, 7, 3)
  for b in range(boxes.shape[0]):
    for n in range(boxes.shape[1]):
      lvl = int(levels[b, n])
      expected, _ = reference_roi_align(feats[lvl][b].astype(np.float64), boxes[b, n],
                                        1.0 / STRIDES[lvl])
      np.testing.assert_allclose(out[b, n], expected, rtol=1e-5, atol=1e-5,
                                 err_msg=f"image {b} box {n} {boxes[b, n]}")
  # The box outside the map reads nothing at all.
  assert np.all(out[0, 4] == 0)


def test_other_levels_use_their_strides():
  """A pyramid of levels 3..4 only: boxes go to P3 or P4 and read at strides 8 and 16."""
  rng = np.random.default_rng(2)
  feats = [rng.standard_normal((2, 64 // s, 96 // s, 3)).astype(np.float32) for s in (8, 16)]
  boxes = _boxes(rng)
  out, levels = roi_align.multilevel_roi_align([jnp.asarray(f) for f in feats],
                                               jnp.asarray(boxes), levels=(3, 4))
  expected_levels = [[reference_level(b, 3, 4) for b in img] for img in boxes.astype(np.float64)]
  np.testing.assert_array_equal(levels, expected_levels)
  assert set(np.asarray(levels).ravel()) == {0, 1}
  for b in range(boxes.shape[0]):
    for n in range(boxes.shape[1]):
      lvl = int(levels[b, n])
      expected, _ = reference_roi_align(feats[lvl][b].astype(np.float64), boxes[b, n],
                                        1.0 / 2**(3 + lvl))
      np.testing.assert_allclose(np.asarray(out[b, n]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", FORMS)
def test_gradient_matches_kernel_taps_and_none_to_boxes(impl):
  """d(sum(out * cotangent)) / d(maps) against the kernel's taps, for both images of a batch,
  with boxes on every level, crossing and leaving the map, degenerate, and NaN."""
  rng = np.random.default_rng(2)
  feats = _features(rng, batch=2, channels=2, height=32, width=64)
  boxes = _boxes(rng)
  boxes[1, 3] = [np.nan, 4.0, 20.0, 30.0]
  cotangent = rng.standard_normal((2, boxes.shape[1], 7, 7, 2)).astype(np.float32)

  def loss(fs, bx):
    out = roi_align.multilevel_roi_align(fs, bx, impl=impl)[0]
    return jnp.sum(out * cotangent)

  grads, box_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))([jnp.asarray(f) for f in feats],
                                                            jnp.asarray(boxes))
  expected = [np.zeros_like(f, np.float64) for f in feats]
  levels = np.asarray(roi_align.assign_levels(jnp.asarray(boxes)))
  assert set(levels.ravel()) == {0, 1, 2, 3}
  for b in range(boxes.shape[0]):
    for n in range(boxes.shape[1]):
      if np.isnan(boxes[b, n]).any():
        continue   # reads nothing, so gives no gradient
      lvl = int(levels[b, n])
      _, taps = reference_roi_align(feats[lvl][b], boxes[b, n], 1.0 / STRIDES[lvl])
      for (ph, pw), bin_taps in taps.items():
        for r, c, w in bin_taps:
          expected[lvl][b, r, c] += w / 4 * cotangent[b, n, ph, pw]
  for lvl in range(4):
    assert np.abs(expected[lvl]).max() > 0   # every level receives some gradient
    np.testing.assert_allclose(np.asarray(grads[lvl]), expected[lvl], rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(box_grad) == 0)


@pytest.mark.parametrize("impl", FORMS)
def test_nan_box_contributes_zero_and_keeps_others(impl):
  rng = np.random.default_rng(3)
  feats = [jnp.asarray(f) for f in _features(rng, batch=1)]
  boxes = np.array([[[np.nan, 0, 10, 10], [10, 12, 30, 40]]], np.float32)
  out, _ = roi_align.multilevel_roi_align(feats, jnp.asarray(boxes), impl=impl)
  out = np.asarray(out)
  assert np.all(out[0, 0] == 0)
  expected, _ = reference_roi_align(np.asarray(feats[0][0], np.float64), boxes[0, 1], 0.25)
  np.testing.assert_allclose(out[0, 1], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", FORMS)
def test_bfloat16_maps_give_bfloat16_features_and_gradients_at_bfloat16_accuracy(impl):
  """bfloat16 maps: the weighted sums accumulate in float32 from float32 weights, so the result
  is the float32 result on the bfloat16-rounded maps, rounded once more (the separable form
  also rounds its interpolation matrices and its intermediate product to bfloat16)."""
  rng = np.random.default_rng(3)
  feats = [jnp.asarray(f) for f in _features(rng, channels=4)]
  rounded = [f.astype(jnp.bfloat16).astype(jnp.float32) for f in feats]
  boxes = jnp.asarray(_boxes(rng))
  cotangent = jnp.asarray(rng.standard_normal((2, boxes.shape[1], 7, 7, 4)), jnp.float32)

  def pooled_and_grads(maps):
    pool = lambda fs: roi_align.multilevel_roi_align(fs, boxes, impl=impl)[0]
    out, vjp = jax.vjp(pool, maps)
    return out, vjp(cotangent.astype(out.dtype))[0]

  out, grads = jax.jit(pooled_and_grads)([f.astype(jnp.bfloat16) for f in feats])
  expected, expected_grads = jax.jit(pooled_and_grads)(rounded)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  rtol = 2**-8 if impl == "gather" else 2**-6
  scale = float(jnp.abs(expected).max())
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=rtol,
                             atol=rtol * scale)
  for g, e in zip(grads, expected_grads):
    np.testing.assert_allclose(np.asarray(g, np.float32), e, rtol=rtol,
                               atol=rtol * float(jnp.abs(e).max()))


def _sizes(hlo: str) -> set[int]:
  """Element counts of every float32 array in an HLO text."""
  return {int(np.prod([int(d) for d in shape.split(",") if d]))
          for shape in re.findall(r"f32\[([\d,]*)\]", hlo)}


def _entry_computation(fn, *args) -> str:
  """The compiled entry computation, with the compiler options of train and predict."""
  hlo = jax.jit(fn, compiler_options=xla_cpu.compiler_options()).lower(*args).compile().as_text()
  return hlo[hlo.index("ENTRY"):]


def test_gather_form_copies_no_map_and_writes_no_taps():
  """Neither the forward nor the backward of the gather form concatenates the levels (a copy
  of every map per call), the backward scatters into each level's map, and the forward never
  writes the [B, N, R, R, taps, C] gathered rows out (each gather is fused into its sum)."""
  feats = [jnp.zeros((2, 256 // s, 256 // s, 16), jnp.float32) for s in STRIDES]
  boxes = jnp.asarray(_boxes(np.random.default_rng(4)))
  pool = lambda fs, bx: roi_align.multilevel_roi_align(fs, bx)[0]
  forward = _entry_computation(pool, feats, boxes)
  backward = _entry_computation(jax.grad(lambda fs, bx: jnp.sum(pool(fs, bx))), feats, boxes)
  assert "gather" in forward and "scatter" in backward
  gathered = boxes.shape[0] * boxes.shape[1] * 7 * 7 * 16 * 16
  assert not re.search(rf"f32\[{boxes.shape[0]},{boxes.shape[1]},7,7,16,16\]", forward)
  assert gathered not in _sizes(forward)
  table = sum(int(np.prod(f.shape)) for f in feats)
  for hlo in (forward, backward):
    assert table not in _sizes(hlo)


def test_unknown_impl_and_wrong_levels_are_refused():
  feats = [jnp.zeros((1, 8, 8, 2))]
  with pytest.raises(ValueError, match="impl"):
    roi_align.multilevel_roi_align(feats, jnp.zeros((1, 1, 4)), levels=(2,), impl="loop")
  with pytest.raises(ValueError, match="1 feature maps but 4 levels"):
    roi_align.multilevel_roi_align(feats, jnp.zeros((1, 1, 4)))
  with pytest.raises(ValueError, match="consecutive"):
    roi_align.multilevel_roi_align(feats * 2, jnp.zeros((1, 1, 4)), levels=(2, 4))
