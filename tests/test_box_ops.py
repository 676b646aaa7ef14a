"""Box geometry against NumPy loops and hand-worked values."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_rcnn_jax.model import box_ops

# Each a case worth its own row: ordinary, identical, contained, disjoint, touching edges, a
# line (zero width), a point, an inverted box, and a zero-area box equal to another.
SPECIAL_BOXES = np.array([
    [0.0, 0.0, 10.0, 10.0],
    [0.0, 0.0, 10.0, 10.0],      # identical to the first
    [2.0, 3.0, 6.0, 7.0],        # inside the first
    [20.0, 20.0, 30.0, 25.0],    # disjoint from the first
    [10.0, 0.0, 15.0, 10.0],     # shares the first's right edge
    [5.0, 1.0, 5.0, 9.0],        # zero width, inside the first
    [4.0, 4.0, 4.0, 4.0],        # a point
    [8.0, 8.0, 3.0, 2.0],        # inverted: treated as empty
    [4.0, 4.0, 4.0, 4.0],        # the same point again (union 0)
], np.float32)


def np_area(b):
  return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)


def np_iou_union_giou(a, b):
  """IoU, union and GIoU of two xyxy boxes, one pair at a time, in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
  ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
  inter = iw * ih
  union = np_area(a) + np_area(b) - inter
  iou = inter / union if union > 0 else 0.0
  ew = max(max(a[2], b[2]) - min(a[0], b[0]), 0.0)
  eh = max(max(a[3], b[3]) - min(a[1], b[1]), 0.0)
  enclosing = ew * eh
  giou = iou - (enclosing - union) / enclosing if enclosing > 0 else iou
  return iou, union, giou


def np_pairwise(boxes1, boxes2):
  n, m = len(boxes1), len(boxes2)
  iou, union, giou = np.zeros((n, m)), np.zeros((n, m)), np.zeros((n, m))
  for i in range(n):
    for j in range(m):
      iou[i, j], union[i, j], giou[i, j] = np_iou_union_giou(boxes1[i], boxes2[j])
  return iou, union, giou


def random_boxes(rng, n, scale=50.0):
  xy = rng.uniform(0, scale, (n, 2))
  wh = rng.uniform(0, scale / 2, (n, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def test_cxcywh_to_xyxy_hand_worked():
  boxes = jnp.array([[5.0, 10.0, 4.0, 6.0], [0.5, 0.5, 1.0, 1.0], [3.0, 3.0, 0.0, 0.0]])
  np.testing.assert_allclose(box_ops.cxcywh_to_xyxy(boxes),
                             [[3, 7, 7, 13], [0, 0, 1, 1], [3, 3, 3, 3]])
  # Any leading shape.
  assert box_ops.cxcywh_to_xyxy(jnp.zeros((2, 3, 5, 4))).shape == (2, 3, 5, 4)


def test_area_clamps_inverted_and_empty_boxes():
  np.testing.assert_allclose(box_ops.area(jnp.asarray(SPECIAL_BOXES)),
                             [np_area(b) for b in SPECIAL_BOXES])
  assert float(box_ops.area(jnp.array([8.0, 8.0, 3.0, 2.0]))) == 0.0


@pytest.mark.parametrize("case", ["special", "random"])
def test_pairwise_iou_union_and_giou_match_a_loop(case):
  rng = np.random.default_rng(0)
  if case == "special":
    boxes1 = boxes2 = SPECIAL_BOXES
  else:
    boxes1, boxes2 = random_boxes(rng, 7), random_boxes(rng, 5)
  iou, union, giou = np_pairwise(boxes1, boxes2)
  got_iou, got_union = box_ops.pairwise_iou_and_union(jnp.asarray(boxes1), jnp.asarray(boxes2))
  got_giou = box_ops.pairwise_generalized_iou(jnp.asarray(boxes1), jnp.asarray(boxes2))
  np.testing.assert_allclose(got_iou, iou, atol=1e-6)
  np.testing.assert_allclose(got_union, union, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got_giou, giou, atol=1e-6)


def test_special_pairs_hand_worked():
  giou = np.asarray(box_ops.pairwise_generalized_iou(jnp.asarray(SPECIAL_BOXES),
                                                     jnp.asarray(SPECIAL_BOXES)))
  iou = np.asarray(box_ops.pairwise_iou_and_union(jnp.asarray(SPECIAL_BOXES),
                                                  jnp.asarray(SPECIAL_BOXES))[0])
  assert iou[0, 1] == giou[0, 1] == 1.0                    # identical
  np.testing.assert_allclose(iou[0, 2], 16 / 100)          # contained: enclosing = union
  np.testing.assert_allclose(giou[0, 2], 16 / 100)
  # Disjoint: enclosing 30 x 25 = 750, union 100 + 50 = 150.
  np.testing.assert_allclose(giou[0, 3], 0 - (750 - 150) / 750, rtol=1e-6)
  # Touching edges: no overlap, enclosing 15 x 10 = union.
  assert iou[0, 4] == 0.0 and giou[0, 4] == 0.0
  # A zero-width box inside the first: IoU 0, enclosing = union = 100.
  assert iou[0, 5] == 0.0 and giou[0, 5] == 0.0
  # Two equal points: union and enclosing are 0, and both IoU and GIoU are 0, not NaN.
  assert iou[6, 8] == 0.0 and giou[6, 8] == 0.0
  assert np.isfinite(giou).all() and (giou >= -1).all() and (giou <= 1).all()


def test_pairwise_broadcasts_over_leading_axes():
  rng = np.random.default_rng(1)
  boxes1 = np.stack([random_boxes(rng, 4) for _ in range(3)])     # [3, 4, 4]
  boxes2 = np.stack([random_boxes(rng, 6) for _ in range(3)])     # [3, 6, 4]
  got = np.asarray(box_ops.pairwise_generalized_iou(jnp.asarray(boxes1), jnp.asarray(boxes2)))
  assert got.shape == (3, 4, 6)
  for b in range(3):
    np.testing.assert_allclose(got[b], np_pairwise(boxes1[b], boxes2[b])[2], atol=1e-6)


def test_elementwise_giou_is_the_diagonal():
  rng = np.random.default_rng(2)
  boxes1 = np.concatenate([random_boxes(rng, 6), SPECIAL_BOXES])
  boxes2 = np.concatenate([random_boxes(rng, 6), SPECIAL_BOXES[::-1]])
  want = [np_iou_union_giou(a, b)[2] for a, b in zip(boxes1, boxes2)]
  got = box_ops.elementwise_generalized_iou(jnp.asarray(boxes1), jnp.asarray(boxes2))
  assert got.shape == (len(boxes1),)
  np.testing.assert_allclose(got, want, atol=1e-6)
  # Leading axes: [2, 3, 4] pairs -> [2, 3].
  got = box_ops.elementwise_generalized_iou(jnp.asarray(boxes1[:6].reshape(2, 3, 4)),
                                            jnp.asarray(boxes2[:6].reshape(2, 3, 4)))
  np.testing.assert_allclose(got, np.reshape(want[:6], (2, 3)), atol=1e-6)


def test_giou_gradients_are_finite_on_degenerate_boxes():
  boxes1 = jnp.asarray(SPECIAL_BOXES)
  boxes2 = jnp.asarray(SPECIAL_BOXES[::-1])
  grads = jax.grad(lambda a, b: jnp.sum(box_ops.elementwise_generalized_iou(a, b)),
                   argnums=(0, 1))(boxes1, boxes2)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_nan_boxes_give_nan_not_plausible_numbers():
  boxes1 = jnp.array([[0.0, 0.0, 10.0, 10.0], [0.0, np.nan, 10.0, 10.0]])
  boxes2 = jnp.array([[0.0, 0.0, 10.0, 10.0]])
  iou, _ = box_ops.pairwise_iou_and_union(boxes1, boxes2)
  giou = box_ops.pairwise_generalized_iou(boxes1, boxes2)
  assert float(iou[0, 0]) == 1.0 and float(giou[0, 0]) == 1.0
  assert np.isnan(float(iou[1, 0])) and np.isnan(float(giou[1, 0]))


def np_apply_deltas(deltas, boxes, weights, scale_clamp):
  """detectron2's Box2BoxTransform.apply_deltas, one box at a time, in float64."""
  out = np.zeros(np.shape(deltas), np.float64)
  for i, (d, b) in enumerate(zip(np.asarray(deltas, np.float64), np.asarray(boxes, np.float64))):
    w, h = b[2] - b[0], b[3] - b[1]
    cx, cy = b[0] + 0.5 * w, b[1] + 0.5 * h
    dx, dy = d[0] / weights[0], d[1] / weights[1]
    dw, dh = min(d[2] / weights[2], scale_clamp), min(d[3] / weights[3], scale_clamp)
    px, py = dx * w + cx, dy * h + cy
    pw, ph = math.exp(dw) * w, math.exp(dh) * h
    out[i] = [px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph]
  return out


def test_official_constants():
  assert box_ops.BBOX_WEIGHTS == (2.0, 2.0, 1.0, 1.0)
  np.testing.assert_allclose(box_ops.SCALE_CLAMP, 8.740336742730447)


def test_apply_deltas_hand_worked():
  boxes = jnp.array([[0.0, 0.0, 10.0, 20.0]])
  # Zero deltas give the box back.
  np.testing.assert_allclose(box_ops.apply_deltas(jnp.zeros((1, 4)), boxes), boxes)
  # Weights (2, 2, 1, 1): centre (5, 10) moves by (2/2 * 10, -2/2 * 20); width doubles.
  got = box_ops.apply_deltas(jnp.array([[2.0, -2.0, math.log(2.0), 0.0]]), boxes)
  np.testing.assert_allclose(got, [[5.0, -20.0, 25.0, 0.0]], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("weights", [box_ops.BBOX_WEIGHTS, (1.0, 2.0, 3.0, 4.0)])
def test_apply_deltas_matches_box2box_transform(weights):
  rng = np.random.default_rng(3)
  boxes = np.concatenate([random_boxes(rng, 20), SPECIAL_BOXES[:7]])
  deltas = rng.normal(0, 2, (len(boxes), 4)).astype(np.float32)
  deltas[:3, 2:] = [[30.0, 50.0], [9.0, -3.0], [1e4, 1e4]]    # beyond the clamp
  want = np_apply_deltas(deltas, boxes, weights, box_ops.SCALE_CLAMP)
  got = box_ops.apply_deltas(jnp.asarray(deltas), jnp.asarray(boxes), weights=weights)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
  # Leading axes [B, N, 4] give the same values.
  got = box_ops.apply_deltas(jnp.asarray(deltas[:24].reshape(2, 12, 4)),
                             jnp.asarray(boxes[:24].reshape(2, 12, 4)), weights=weights)
  np.testing.assert_allclose(got, want[:24].reshape(2, 12, 4), rtol=1e-5, atol=1e-3)


def test_apply_deltas_clamp_limits_the_growth():
  boxes = jnp.array([[0.0, 0.0, 16.0, 16.0]])
  got = np.asarray(box_ops.apply_deltas(jnp.array([[0.0, 0.0, 100.0, 100.0]]), boxes))
  # exp(log(100000 / 16)) * 16 = 100000 wide and high, centred on (8, 8).
  np.testing.assert_allclose(got, [[8 - 50000, 8 - 50000, 8 + 50000, 8 + 50000]], rtol=1e-5)
  # A custom clamp.
  got = box_ops.apply_deltas(jnp.array([[0.0, 0.0, 5.0, -1.0]]), boxes, scale_clamp=math.log(2))
  np.testing.assert_allclose(got, [[-8.0, 8 - 8 * math.exp(-1), 24.0, 8 + 8 * math.exp(-1)]],
                             rtol=1e-5)
