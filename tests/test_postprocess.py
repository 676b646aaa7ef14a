"""Postprocessing against a NumPy implementation of its rule, image by image."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_rcnn_jax.evaluation import postprocess


def np_postprocess(logits, boxes, whwh, orig_size, k):
  """The rule of postprocess.py's docstring, written independently: one image at a time."""
  out = {name: [] for name in ("scores", "labels", "boxes", "proposal_index", "valid")}
  for b in range(logits.shape[0]):
    num, num_classes = logits[b].shape
    scores = 1.0 / (1.0 + np.exp(-logits[b].astype(np.float64)))
    flat = [(scores[p, c], p * num_classes + c) for p in range(num) for c in range(num_classes)]
    flat.sort(key=lambda entry: (-entry[0], entry[1]))    # descending, equal scores by entry
    top = flat[:k]
    h, w = orig_size[b]
    sx, sy = w / whwh[b, 0], h / whwh[b, 1]
    dets = []
    for _, entry in top:
      x1, y1, x2, y2 = boxes[b, entry // num_classes] * np.array([sx, sy, sx, sy])
      x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)
      y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
      dets.append((x1, y1, x2, y2))
    out["scores"].append([s for s, _ in top])
    out["labels"].append([e % num_classes for _, e in top])
    out["proposal_index"].append([e // num_classes for _, e in top])
    out["boxes"].append(dets)
    out["valid"].append([x2 > x1 and y2 > y1 for x1, y1, x2, y2 in dets])
  return {name: np.asarray(v) for name, v in out.items()}


def make_inputs(rng, batch=3, num=6, num_classes=4):
  """Logits on a coarse grid (many exact ties), boxes partly outside their images, and images
  of different resized and original sizes."""
  logits = rng.choice(np.arange(-4.0, 4.5, 1.0), (batch, num, num_classes)).astype(np.float32)
  whwh = np.array([[96, 64, 96, 64], [50, 80, 50, 80], [64, 64, 64, 64]], np.float32)[:batch]
  orig_size = np.array([[480, 720], [123, 77], [64, 64]], np.int32)[:batch]   # (h, w)
  xy = rng.uniform(-30, 90, (batch, num, 2))
  wh = rng.uniform(0, 40, (batch, num, 2))
  boxes = np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)
  boxes[:, 0] = [-20.0, 10.0, -5.0, 40.0]          # left of the image: zero width
  boxes[:, 3] = [10.0, -30.0, 40.0, -10.0]         # above the image: zero height
  boxes[:, 1] = [10.0, 10.0, 300.0, 40.0]          # reaches past the right edge: clipped
  boxes[:, 2] = [30.0, 30.0, 20.0, 50.0]           # inverted: empty
  return logits, boxes, whwh, orig_size


@pytest.mark.parametrize("k", [None, 7, 24])
def test_matches_numpy_rule(k):
  logits, boxes, whwh, orig_size = make_inputs(np.random.default_rng(0))
  got = jax.tree.map(np.asarray, postprocess.postprocess(
      jnp.asarray(logits), jnp.asarray(boxes), jnp.asarray(whwh), jnp.asarray(orig_size), k))
  num = logits.shape[1]
  want = np_postprocess(logits, boxes, whwh, orig_size, num if k is None else k)
  assert got["scores"].shape == (3, num if k is None else k)
  assert got["labels"].dtype == np.int32 and got["proposal_index"].dtype == np.int32
  np.testing.assert_array_equal(got["labels"], want["labels"])
  np.testing.assert_array_equal(got["proposal_index"], want["proposal_index"])
  np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-6)
  np.testing.assert_allclose(got["boxes"], want["boxes"], rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(got["valid"], want["valid"])


def test_every_score_kept_when_k_is_all():
  logits, boxes, whwh, orig_size = make_inputs(np.random.default_rng(1))
  n, c = logits.shape[1:]
  got = postprocess.postprocess(jnp.asarray(logits), jnp.asarray(boxes), jnp.asarray(whwh),
                                jnp.asarray(orig_size), n * c)
  # Every (proposal, class) pair appears exactly once: no NMS, no threshold.
  pairs = np.asarray(got["proposal_index"]) * c + np.asarray(got["labels"])
  for b in range(len(pairs)):
    assert sorted(pairs[b]) == list(range(n * c))
  assert (np.diff(np.asarray(got["scores"]), axis=1) <= 0).all()


def test_hand_worked_image():
  # 2 proposals, 2 classes; entries (p, c): (0,0) 0.5, (0,1) 0.88, (1,0) 0.88, (1,1) 0.12.
  logits = jnp.array([[[0.0, 2.0], [2.0, -2.0]]])
  boxes = jnp.array([[[10.0, 5.0, 30.0, 25.0], [-10.0, 0.0, 60.0, 10.0]]])
  whwh = jnp.array([[50.0, 40.0, 50.0, 40.0]])
  orig_size = jnp.array([[80, 100]])         # (h, w): x scales by 2, y by 2
  got = jax.tree.map(np.asarray, postprocess.postprocess(logits, boxes, whwh, orig_size, 3))
  np.testing.assert_array_equal(got["proposal_index"], [[0, 1, 0]])   # the tie: entry 1 first
  np.testing.assert_array_equal(got["labels"], [[1, 0, 0]])
  np.testing.assert_allclose(got["scores"], [[1 / (1 + np.exp(-2))] * 2 + [0.5]], rtol=1e-6)
  np.testing.assert_allclose(got["boxes"][0], [[20, 10, 60, 50], [0, 0, 100, 20],
                                               [20, 10, 60, 50]])
  assert got["valid"].all()
