"""The set-prediction loss against the official code's values and gradients (shared/reference)."""
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh

from sparse_rcnn_jax.convert import checkpoint_io
from sparse_rcnn_jax.model import box_ops
from sparse_rcnn_jax.model import official
from sparse_rcnn_jax.model.dynamic_head import DynamicHead
from sparse_rcnn_jax.model.dynamic_head import HeadStage
from sparse_rcnn_jax.training import losses
from sparse_rcnn_jax.training import matcher
from test_dynamic_head import reference_head_config
from test_matcher import reference_targets

CONFIG = ml_collections.ConfigDict(dict(class_weight=2.0, l1_weight=5.0, giou_weight=2.0,
                                        focal_alpha=0.25, focal_gamma=2.0, matcher="scipy"))


@pytest.fixture(scope="module")
def io(reference_dir):
  return dict(np.load(reference_dir / "sparse_rcnn_dev_io.npz"))


def reference_outputs(io):
  """The official stage outputs: pred_logits [S, B, N, C], pred_boxes [S, B, N, 4]."""
  return (np.stack([io[f"stage{s}/pred_logits"] for s in range(2)]),
          np.stack([io[f"stage{s}/pred_boxes"] for s in range(2)]))


@pytest.mark.parametrize("scenario", ["main", "empty"])
def test_every_term_of_every_stage_matches_official(io, scenario):
  """Scenario "empty" has an image without boxes: all its proposals are negatives."""
  logits, boxes = reference_outputs(io)
  total, metrics = jax.jit(lambda l, b, t: losses.set_prediction_loss(l, b, t, CONFIG))(
      logits, boxes, reference_targets(io, scenario))
  for term, s in itertools.product(losses.TERMS, range(2)):
    official_key = f"{term}_0" if s == 0 else term   # official: no suffix = last stage
    np.testing.assert_allclose(metrics[f"{term}_{s}"], io[f"loss/{scenario}/{official_key}"],
                               rtol=1e-5, err_msg=f"{term}_{s}")
    np.testing.assert_allclose(metrics[f"weighted_{term}_{s}"],
                               io[f"loss_weighted/{scenario}/{official_key}"], rtol=1e-5)
  np.testing.assert_allclose(metrics["num_boxes"], io[f"loss/{scenario}/num_boxes"])
  np.testing.assert_allclose(total, io[f"loss_weighted/{scenario}/total"], rtol=1e-5)
  assert metrics["num_nonfinite_costs"] == 0


def test_sigmoid_focal_loss_against_numpy():
  logits = np.array([-120.0, -8.0, -1.0, 0.0, 0.5, 3.0, 120.0], np.float32)
  x = logits.astype(np.float64)
  p = 1 / (1 + np.exp(-x))
  for target in (0.0, 1.0):
    ce = np.logaddexp(0, -x) if target else np.logaddexp(0, x)
    p_t = p * target + (1 - p) * (1 - target)
    want = (0.25 * target + 0.75 * (1 - target)) * (1 - p_t) ** 2 * ce
    got = losses.sigmoid_focal_loss(logits, np.full_like(logits, target))
    # 1 - p_t cancels in float32 for confident predictions (as in fvcore): ~1e-4 relative.
    np.testing.assert_allclose(got, want, rtol=3e-4, atol=1e-30)


def test_num_boxes_is_averaged_over_devices_and_at_least_one():
  mask = np.zeros((4, 5), bool)
  assert losses.num_boxes_per_device(mask, 1) == 1.0
  mask[:, :3] = True                                   # 12 boxes
  assert losses.num_boxes_per_device(mask, 1) == 12.0
  assert losses.num_boxes_per_device(mask, 8) == 1.5
  assert losses.num_boxes_per_device(mask[:1, :1], 8) == 1.0


def synthetic_batch(seed=0, b=2, n=6, c=3, m=4):
  rng = np.random.default_rng(seed)
  xy = rng.uniform(0, 50, (2, b, n, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (2, b, n, 2))], -1).astype(np.float32)
  gxy = rng.uniform(0, 50, (b, m, 2))
  targets = {"gt_boxes": np.concatenate([gxy, gxy + rng.uniform(5, 40, (b, m, 2))],
                                        -1).astype(np.float32),
             "gt_labels": rng.integers(0, c, (b, m)).astype(np.int32),
             "gt_mask": np.array([[True, True, False, False]] * b),
             "image_whwh": np.tile(np.array([[100, 80, 100, 80]], np.float32), (b, 1))}
  return rng.normal(size=(2, b, n, c)).astype(np.float32), boxes, targets


def loss_and_grads(logits, boxes, targets):
  fn = lambda l, b: losses.set_prediction_loss(l, b, targets, CONFIG)
  (total, metrics), grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(
      logits, boxes)
  return total, metrics, grads


def test_degenerate_and_inverted_boxes_give_finite_loss_and_gradients():
  logits, boxes, targets = synthetic_batch()
  boxes[:, :, 0] = boxes[:, :, 0, [0, 1, 0, 1]]        # zero-size point boxes
  boxes[:, :, 1] = boxes[:, :, 1, [2, 3, 0, 1]]        # inverted boxes
  targets["gt_boxes"][:, 1, 2:] = targets["gt_boxes"][:, 1, :2]   # a zero-size ground truth
  total, _, grads = loss_and_grads(logits, boxes, targets)
  assert np.isfinite(total)
  assert all(np.isfinite(g).all() for g in grads)


def test_a_nan_box_never_wins_a_match_and_is_reported():
  """A NaN proposal loses every slot to finite ones (loss and gradients stay finite); a NaN
  that must be matched makes the loss NaN instead of hiding."""
  logits, boxes, targets = synthetic_batch()
  clean_total, clean_metrics, _ = loss_and_grads(logits, boxes, targets)
  proposal = 3
  boxes[:, :, proposal] = np.nan
  logits[:, :, proposal] = -30.0    # its focal term is ~0, so the totals are comparable
  total, metrics, grads = loss_and_grads(logits, boxes, targets)
  assert np.isfinite(total) and all(np.isfinite(g).all() for g in grads)
  # Two stages x two images x two real slots: one NaN cost per (slot, stage, image).
  assert metrics["num_nonfinite_costs"] == 2 * 2 * 2
  assert clean_metrics["num_nonfinite_costs"] == 0
  boxes[:] = np.nan
  total, metrics, _ = loss_and_grads(logits, boxes, targets)
  assert np.isnan(total)


def test_padding_and_empty_images_contribute_nothing():
  """Changing what padded slots hold, or the boxes of an image without ground truth, changes
  neither the loss nor the gradients of the other images."""
  logits, boxes, targets = synthetic_batch()
  targets["gt_mask"][1] = False
  want_total, _, want_grads = loss_and_grads(logits, boxes, targets)
  targets["gt_boxes"][:, 2:] = np.nan
  targets["gt_boxes"][1] = 1e9
  targets["gt_labels"][:, 2:] = 2
  total, _, grads = loss_and_grads(logits, boxes, targets)
  np.testing.assert_allclose(total, want_total, rtol=1e-6)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
  assert not np.asarray(grads[1][:, 1]).any()      # boxes of the empty image: no gradient


def test_one_host_round_trip_per_loss_and_gradient(monkeypatch):
  calls = []
  solve = matcher.solve_assignments
  monkeypatch.setattr(matcher, "solve_assignments", lambda c, m: calls.append(c.shape) or
                      solve(c, m))
  logits, boxes, targets = synthetic_batch()
  jax.block_until_ready(loss_and_grads(logits, boxes, targets))
  assert calls == [(2 * 2, 6, 4)]      # all images x stages in one call


def with_matcher(name: str) -> ml_collections.ConfigDict:
  config = CONFIG.copy_and_resolve_references()
  config.matcher = name
  return config


@pytest.mark.parametrize("seed,n", [(0, 6), (1, 1), (2, 9)])
def test_device_matcher_gives_the_scipy_loss_and_gradients(seed, n):
  """Random continuous costs have no ties, so both matchers pick the same pairs; n=1 has
  fewer proposals than ground-truth boxes."""
  logits, boxes, targets = synthetic_batch(seed, b=3, n=n)
  targets["gt_mask"][2] = False

  def run(name):
    fn = lambda l, b: losses.set_prediction_loss(l, b, targets, with_matcher(name))
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(logits, boxes)

  (want_total, want_metrics), want_grads = run("scipy")
  (total, metrics), grads = run("device")
  np.testing.assert_allclose(total, want_total, rtol=1e-6)
  for key, want in want_metrics.items():
    np.testing.assert_allclose(metrics[key], want, rtol=1e-6, atol=1e-7, err_msg=key)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["scipy", "device"])
def test_only_the_scipy_matcher_calls_the_host(name):
  """The compiled loss and gradient: a host callback with "scipy", none with "device"."""
  logits, boxes, targets = synthetic_batch()
  fn = lambda l, b: losses.set_prediction_loss(l, b, targets, with_matcher(name))[0]
  lowered = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(logits, boxes)
  for text in (lowered.as_text(), lowered.compile().as_text()):
    assert ("callback" in text.lower()) == (name == "scipy")


@pytest.mark.parametrize("name,solver", [("scipy", "pure_callback"), ("device", "scan")])
def test_the_loss_and_the_matching_have_their_name_scopes(name, solver):
  """Every op of the loss under "set_prediction_loss", the solve under ".../matching"."""
  logits, boxes, targets = synthetic_batch()
  jaxpr = jax.make_jaxpr(lambda l, b: losses.set_prediction_loss(
      l, b, targets, with_matcher(name)))(logits, boxes)
  stacks = [(str(e.source_info.name_stack), e.primitive.name) for e in jaxpr.eqns]
  assert all(stack.startswith("set_prediction_loss") for stack, _ in stacks)
  solves = [stack for stack, primitive in stacks if primitive == solver]
  assert solves and all(s.startswith("set_prediction_loss/matching") for s in solves)


def test_a_mesh_without_the_data_axis_is_reported():
  logits, boxes, targets = synthetic_batch()
  mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
  with pytest.raises(ValueError, match="splits the batch over 'data'"):
    losses.set_prediction_loss(logits, boxes, targets, CONFIG, mesh=mesh)


@pytest.fixture(scope="module")
def head_inputs(reference_dir, io):
  cfg = reference_head_config(reference_dir)
  state = checkpoint_io.load_state_dict(reference_dir / "sparse_rcnn_dev_params.npz")
  params = official.head_from_official(state, cfg)
  features = [jnp.asarray(io[f"inputs/p{l}"].astype(np.float32).transpose(0, 2, 3, 1))
              for l in range(2, 6)]
  grads = dict(np.load(reference_dir / "sparse_rcnn_dev_grads.npz"))
  return cfg, params, features, reference_targets(io, "main"), grads


def assert_gradients_match(grads, features_grads, cfg, reference, rtol):
  """Every parameter (official names) and input map, relative to its largest entry."""
  ours = official.head_to_official(grads, cfg)
  ours.update({f"features/p{l}": np.asarray(g).transpose(0, 3, 1, 2)
               for l, g in zip(range(2, 6), features_grads)})
  assert sorted(ours) == sorted(reference)
  for name, want in reference.items():
    scale = max(float(np.abs(want).max()), 1e-12)
    np.testing.assert_allclose(ours[name], want, rtol=0, atol=rtol * scale, err_msg=name)


def test_gradients_match_official_given_its_stage_boxes(head_inputs, io):
  """The loss's gradient, isolated: each stage gets the official (detached) input boxes, so
  the graph and its inputs are exactly the official ones; agreement to float32 precision."""
  cfg, params, features, targets, reference = head_inputs
  whwh = jnp.asarray(targets["image_whwh"])

  def total(params, features):
    feats = jnp.broadcast_to(params["proposal_features"][None],
                             (2,) + params["proposal_features"].shape)
    boxes = box_ops.cxcywh_to_xyxy(params["proposal_boxes"])[None] * whwh[:, None, :]
    outs = []
    for s in range(cfg.num_stages):
      stage_boxes = boxes if s == 0 else jnp.asarray(io[f"stage{s}/boxes_in"])
      logits, pred_boxes, feats = HeadStage(cfg).apply({"params": params[f"stage{s}"]}, features,
                                                   stage_boxes, feats)
      outs.append((logits, pred_boxes))
    logits, pred_boxes = (jnp.stack(x) for x in zip(*outs))
    return losses.set_prediction_loss(logits, pred_boxes, targets, CONFIG)[0]

  value, (grads, feature_grads) = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(
      params, features)
  np.testing.assert_allclose(value, io["loss_weighted/main/total"], rtol=1e-5)
  assert_gradients_match(grads, feature_grads, cfg, reference, rtol=1e-4)


def test_gradients_match_official_through_the_dynamic_head(head_inputs, io):
  """End to end as training differentiates it. Our stage-0 boxes differ from the official
  ones by float32 rounding (~1e-6), which stage 1's bilinear sampling amplifies to ~2e-4 in
  some gradients (the test above, with the official boxes, agrees to 3e-5)."""
  cfg, params, features, targets, reference = head_inputs

  def total(params, features):
    out = DynamicHead(cfg).apply({"params": params}, features,
                                 jnp.asarray(targets["image_whwh"]))
    return losses.set_prediction_loss(out["pred_logits"], out["pred_boxes"], targets,
                                      CONFIG)[0]

  value, (grads, feature_grads) = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(
      params, features)
  np.testing.assert_allclose(value, io["loss_weighted/main/total"], rtol=1e-5)
  assert_gradients_match(grads, feature_grads, cfg, reference, rtol=5e-4)
