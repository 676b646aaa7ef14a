"""The matcher: costs and assignments against the official code's, and against brute force."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_rcnn_jax.training import matcher

WEIGHTS = dict(class_weight=2.0, l1_weight=5.0, giou_weight=2.0, focal_alpha=0.25,
               focal_gamma=2.0)


def brute_force_cost(costs: np.ndarray, mask: np.ndarray) -> float:
  """Minimum total cost of a one-to-one matching of min(N, valid) pairs, by enumeration."""
  cols = np.flatnonzero(mask)
  n = costs.shape[0]
  if cols.size == 0:
    return 0.0
  block = costs[:, cols]
  if cols.size <= n:
    return min(sum(block[r, j] for j, r in enumerate(rows))
               for rows in itertools.permutations(range(n), cols.size))
  return min(sum(block[i, c] for i, c in enumerate(chosen))
             for chosen in itertools.permutations(range(cols.size), n))


def assignment_cost(costs, mask, pred_index, match_mask) -> float:
  """Total cost of an assignment, after checking it is one-to-one and only on real slots."""
  assert not np.any(match_mask & ~mask), "a padding slot was matched"
  rows = pred_index[match_mask]
  assert len(set(rows.tolist())) == rows.size, "a proposal was matched twice"
  assert match_mask.sum() == min(costs.shape[0], mask.sum())
  return float(sum(costs[r, c] for r, c in zip(rows, np.flatnonzero(match_mask))))


def random_problems(rng, count: int):
  """Small [K, N, M] blocks with random masks, including all-empty and all-full ones."""
  for _ in range(count):
    k, n, m = rng.integers(1, 4), rng.integers(1, 6), rng.integers(1, 6)
    costs = rng.normal(size=(k, n, m)).astype(np.float32)
    mask = rng.random((k, m)) < 0.6
    mask[0] = rng.random() < 0.5      # some blocks with no ground truth, some full
    yield costs, mask


def test_solve_assignments_is_optimal_against_brute_force():
  rng = np.random.default_rng(0)
  for costs, mask in random_problems(rng, 60):
    pred_index, match_mask = matcher.solve_assignments(costs, mask)
    for k in range(costs.shape[0]):
      got = assignment_cost(costs[k], mask[k], pred_index[k], match_mask[k])
      np.testing.assert_allclose(got, brute_force_cost(costs[k], mask[k]), rtol=1e-5, atol=1e-5)


def test_scipy_match_in_jit_equals_the_host_solver():
  """Through pure_callback, with batch and stage axes, masks and an image without boxes."""
  rng = np.random.default_rng(1)
  costs = rng.normal(size=(3, 2, 5, 4)).astype(np.float32)   # [B, S, N, M]
  mask = np.broadcast_to((rng.random((3, 1, 4)) < 0.7), (3, 2, 4)).copy()
  mask[1] = False
  pred_index, match_mask = jax.jit(matcher.scipy_match)(costs, mask)
  want_index, want_mask = matcher.solve_assignments(costs.reshape(-1, 5, 4), mask.reshape(-1, 4))
  np.testing.assert_array_equal(np.asarray(match_mask).reshape(-1, 4), want_mask)
  np.testing.assert_array_equal(np.asarray(pred_index).reshape(-1, 4)[want_mask],
                                want_index[want_mask])
  assert not np.asarray(match_mask)[1].any()


def test_one_host_round_trip_for_all_stages_and_images(monkeypatch):
  calls = []
  solve = matcher.solve_assignments
  monkeypatch.setattr(matcher, "solve_assignments", lambda c, m: calls.append(c.shape) or
                      solve(c, m))
  costs = np.random.default_rng(2).normal(size=(4, 6, 8, 3)).astype(np.float32)
  jax.block_until_ready(jax.jit(matcher.scipy_match)(costs, np.ones((4, 6, 3), bool)))
  assert calls == [(24, 8, 3)]


def test_vmap_makes_one_round_trip_and_keeps_results(monkeypatch):
  calls = []
  solve = matcher.solve_assignments
  monkeypatch.setattr(matcher, "solve_assignments", lambda c, m: calls.append(c.shape) or
                      solve(c, m))
  rng = np.random.default_rng(3)
  costs = rng.normal(size=(5, 2, 4, 3)).astype(np.float32)
  mask = rng.random((2, 3)) < 0.8      # not vmapped: broadcast to every element
  pred_index, match_mask = jax.jit(jax.vmap(matcher.scipy_match, in_axes=(0, None)))(
      costs, mask)
  assert calls == [(10, 4, 3)]
  for v in range(5):
    want_index, want_mask = matcher.solve_assignments(costs[v], mask)
    np.testing.assert_array_equal(np.asarray(match_mask[v]), want_mask)
    np.testing.assert_array_equal(np.asarray(pred_index[v])[want_mask], want_index[want_mask])


def test_large_costs_are_passed_in_chunks_and_reassembled():
  """Costs above the callback's per-argument limit arrive intact."""
  rng = np.random.default_rng(4)
  costs = rng.normal(size=(3, 2, 60, 100)).astype(np.float32)   # 144 KB
  assert len(matcher._to_chunks(jnp.asarray(costs))) > 1
  mask = rng.random((3, 2, 100)) < 0.5
  pred_index, match_mask = jax.jit(matcher.scipy_match)(costs, mask)
  want_index, want_mask = matcher.solve_assignments(costs.reshape(-1, 60, 100),
                                                    mask.reshape(-1, 100))
  np.testing.assert_array_equal(np.asarray(match_mask).reshape(-1, 100), want_mask)
  np.testing.assert_array_equal(np.asarray(pred_index).reshape(-1, 100)[want_mask],
                                want_index[want_mask])


def test_nonfinite_costs_lose_to_every_finite_choice():
  """NaN / inf never win a slot over a finite proposal, and a slot with nothing finite is
  still matched (so its loss shows the NaN) instead of raising like scipy."""
  rng = np.random.default_rng(5)
  for _ in range(30):
    costs = rng.normal(size=(1, 5, 3))
    bad = rng.random((1, 5, 3)) < 0.3
    costs[bad] = rng.choice([np.nan, np.inf, -np.inf], size=bad.sum())
    mask = np.ones((1, 3), bool)
    pred_index, match_mask = matcher.solve_assignments(costs, mask)
    used_bad = sum(bad[0, r, c] for r, c in zip(pred_index[0], range(3)))
    # Fewest non-finite pairs possible: brute force with non-finite as one unit of penalty.
    fewest = brute_force_cost(bad[0].astype(float), mask[0])
    assert match_mask.all() and used_bad == fewest
  all_nan = np.full((1, 4, 2), np.nan)
  assert matcher.solve_assignments(all_nan, np.ones((1, 2), bool))[1].all()


def test_focal_class_cost_against_a_numpy_loop():
  rng = np.random.default_rng(6)
  logits = rng.normal(scale=3, size=(2, 4, 5)).astype(np.float32)
  labels = rng.integers(0, 5, (2, 3))
  got = np.asarray(matcher.focal_class_cost(logits, labels, 0.25, 2.0))
  for b, n, m in itertools.product(range(2), range(4), range(3)):
    p = 1 / (1 + np.exp(-np.float64(logits[b, n, labels[b, m]])))
    want = (0.25 * (1 - p) ** 2 * -np.log(p + 1e-8) - 0.75 * p ** 2 * -np.log(1 - p + 1e-8))
    np.testing.assert_allclose(got[b, n, m], want, rtol=1e-5, atol=1e-6)


def reference_targets(io, scenario: str, max_boxes: int = 6):
  """Padded [B, M] targets of a reference scenario."""
  boxes = np.zeros((2, max_boxes, 4), np.float32)
  labels = np.zeros((2, max_boxes), np.int32)
  mask = np.zeros((2, max_boxes), bool)
  for b in range(2):
    lab = io[f"targets/{scenario}/img{b}/labels"]
    boxes[b, :len(lab)] = io[f"targets/{scenario}/img{b}/boxes_xyxy"]
    labels[b, :len(lab)] = lab
    mask[b, :len(lab)] = True
  return {"gt_boxes": boxes, "gt_labels": labels, "gt_mask": mask,
          "image_whwh": io["inputs/images_whwh"].astype(np.float32)}


@pytest.fixture(scope="module")
def io(reference_dir):
  return dict(np.load(reference_dir / "sparse_rcnn_dev_io.npz"))


@pytest.mark.parametrize("scenario", ["main", "empty"])
def test_costs_and_assignments_match_official(io, scenario):
  t = reference_targets(io, scenario)
  logits = np.stack([io[f"stage{s}/pred_logits"] for s in range(2)], axis=1)   # [B, S, N, C]
  boxes = np.stack([io[f"stage{s}/pred_boxes"] for s in range(2)], axis=1)
  costs = matcher.match_costs(logits, boxes, t["gt_boxes"][:, None], t["gt_labels"][:, None],
                              t["image_whwh"][:, None], **WEIGHTS)
  mask = np.broadcast_to(t["gt_mask"][:, None], (2, 2, 6))
  pred_index, match_mask = jax.jit(matcher.scipy_match)(costs, mask)
  for s, b in itertools.product(range(2), range(2)):
    key = f"match/{scenario}/stage{s}/img{b}"
    n = int(t["gt_mask"][b].sum())
    ref_cost = io[f"{key}/cost"]
    np.testing.assert_allclose(np.asarray(costs[b, s, :, :n]), ref_cost, rtol=1e-5,
                               atol=1e-5 * np.abs(ref_cost).max(initial=1.0), err_msg=key)
    # Official: proposals `src` (ascending) matched to slots `tgt`.
    src, tgt = io[f"{key}/src"], io[f"{key}/tgt"]
    assert np.asarray(match_mask[b, s, :n]).all() and not np.asarray(match_mask[b, s, n:]).any()
    np.testing.assert_array_equal(np.asarray(pred_index[b, s])[tgt], src, err_msg=key)


def test_unknown_matcher_name_is_reported():
  with pytest.raises(ValueError, match="expected one of"):
    matcher.get_matcher("sinkhorn")


# (proposals N, slots M) of the device matcher's random problems: N >= M and N < M, a single
# proposal or slot, no slots at all, and the largest sizes (300 proposals, 100 slots).
DEVICE_SHAPES = [(1, 1), (1, 9), (6, 0), (7, 3), (10, 20), (20, 10), (37, 64), (64, 37),
                 (100, 100), (300, 7), (3, 100), (300, 100)]
PROBLEMS_PER_SHAPE = 45


def device_problems(rng, k: int, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
  """k random [N, M] blocks: float costs of varied scale, integer costs (ties), NaN/+-inf
  entries in some, and masks from empty (an image without boxes) to full."""
  costs = rng.normal(size=(k, n, m)) * 10.0 ** rng.uniform(-2, 2, (k, 1, 1))
  ties = rng.random(k) < 0.3
  costs[ties] = rng.integers(-3, 4, (ties.sum(), n, m))
  density = rng.choice([0.0, 0.02, 0.3, 0.9], size=(k, 1, 1), p=[0.5, 0.2, 0.15, 0.15])
  bad = rng.random((k, n, m)) < density
  costs[bad] = rng.choice([np.nan, np.inf, -np.inf], size=bad.sum())
  costs[-1] = np.nan                                       # nothing finite at all
  mask = rng.random((k, m)) < rng.choice([0.0, 0.1, 0.5, 0.9, 1.0], size=(k, 1),
                                         p=[0.1, 0.2, 0.3, 0.2, 0.2])
  mask[0] = False                                          # an image without boxes
  return costs.astype(np.float32), mask


def replaced_total(costs, mask, pred_index, match_mask) -> float:
  """Total cost in float64 of an assignment on `_finite_block`'s matrix, after checking it
  holds min(N, real slots) one-to-one pairs on real slots and 0 on unmatched slots."""
  assert not np.any(match_mask & ~mask), "a padding slot was matched"
  assert match_mask.sum() == min(costs.shape[0], mask.sum())
  rows = pred_index[match_mask]
  assert len(set(rows.tolist())) == rows.size, "a proposal was matched twice"
  assert not pred_index[~match_mask].any()
  cols = np.flatnonzero(mask)
  block = np.zeros(costs.shape)
  block[:, cols] = matcher._finite_block(costs[:, cols].astype(np.float64))
  return float(block[rows, np.flatnonzero(match_mask)].sum())


@pytest.mark.parametrize("n,m", DEVICE_SHAPES)
def test_device_matcher_cost_equals_scipy(n, m):
  """The device solve against scipy on 45 problems of each shape (540 in all), solved in one
  vmapped call: the same total cost of the replaced matrix, to float32 precision."""
  rng = np.random.default_rng(100 + n * 1000 + m)
  costs, mask = device_problems(rng, PROBLEMS_PER_SHAPE, n, m)
  pred_index, match_mask = jax.device_get(jax.jit(matcher.device_match)(costs, mask))
  assert pred_index.dtype == np.int32 and pred_index.shape == match_mask.shape == mask.shape
  want_index, want_mask = matcher.solve_assignments(costs, mask)
  for k in range(PROBLEMS_PER_SHAPE):
    got = replaced_total(costs[k], mask[k], pred_index[k], match_mask[k])
    want = replaced_total(costs[k], mask[k], want_index[k], want_mask[k])
    assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (k, got, want)


def test_device_matcher_keeps_leading_axes():
  """[B, S, N, M] costs and a mask broadcast over stages, as the loss passes them."""
  rng = np.random.default_rng(7)
  costs = rng.normal(size=(3, 2, 5, 4)).astype(np.float32)
  mask = np.broadcast_to(rng.random((3, 1, 4)) < 0.7, (3, 2, 4)).copy()
  mask[1] = False
  pred_index, match_mask = jax.jit(matcher.device_match)(costs, mask)
  want_index, want_mask = matcher.solve_assignments(costs.reshape(-1, 5, 4), mask.reshape(-1, 4))
  np.testing.assert_array_equal(np.asarray(match_mask).reshape(-1, 4), want_mask)
  np.testing.assert_array_equal(np.asarray(pred_index).reshape(-1, 4), want_index)


def test_device_matcher_with_costs_too_large_to_step_by_one():
  """At 3e8 float32 steps by 32, so `hi + 1` would round to hi, leave the largest real cost at
  0 beside the padded slots' 0, and let the solver skip real slots; fewer proposals than real
  slots, and padded slots first, make that happen."""
  rng = np.random.default_rng(8)
  costs = (3e8 + 32 * rng.integers(0, 2, (64, 4, 10))).astype(np.float32)
  mask = np.broadcast_to(np.arange(10) >= 5, (64, 10))
  pred_index, match_mask = jax.device_get(jax.jit(matcher.device_match)(costs, mask))
  want_index, want_mask = matcher.solve_assignments(costs, mask)
  for k in range(64):
    assert replaced_total(costs[k], mask[k], pred_index[k], match_mask[k]) == \
        replaced_total(costs[k], mask[k], want_index[k], want_mask[k])
