"""Optimizer: schedule values against detectron2's, one AdamW step against PyTorch's formula,
frozen masking, non-finite updates skipped and counted."""
import bisect

import jax
import ml_collections
import numpy as np
import optax
import pytest

from configs import r50_100pro_3x
from configs import tiny
from sparse_rcnn_jax.model import detector
from sparse_rcnn_jax.training import optim


@pytest.mark.parametrize("step,batch,expected", [
    (0, 16, 2.5e-7),                         # warmup starts at factor 0.01
    (500, 16, 2.5e-5 * (0.01 * 0.5 + 0.5)),  # halfway through warmup
    (1000, 16, 2.5e-5),
    (209_999, 16, 2.5e-5),
    (210_000, 16, 2.5e-6),                   # first milestone, absolute step
    (250_000, 16, 2.5e-7),
    (5000, 32, 5e-5),                        # linear scaling with the global batch
    (5000, 2, 3.125e-6),
])
def test_schedule_is_detectron2_warmup_multistep(step, batch, expected):
  config = r50_100pro_3x.get_config()
  schedule = optim.learning_rate(config.optimizer, batch, 270_000)
  assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)


def _detectron2_lr(optimizer, batch_size, num_steps, steps):
  """detectron2's WarmupMultiStepLR.get_lr (linear warmup), in float64, one step at a time."""
  base = optimizer.base_learning_rate * batch_size / optimizer.base_batch_size
  milestones = sorted(int(f * num_steps) for f in optimizer.decay_at)
  out = []
  for step in steps:
    warmup = 1.0
    if step < optimizer.warmup_steps:
      alpha = step / optimizer.warmup_steps
      warmup = optimizer.warmup_factor * (1 - alpha) + alpha
    out.append(base * warmup * optimizer.decay_factor ** bisect.bisect_right(milestones, step))
  return np.array(out)


@pytest.mark.parametrize("changes,num_steps", [
    ({}, 270_000),                                          # the 3x recipe, every step
    ({"warmup_steps": 0}, 100),                             # no warmup: full lr from step 0
    ({"decay_at": ()}, 3000),                               # no decay
    ({"decay_at": (0.1, 0.1, 0.5)}, 4000),                  # in the warmup, and repeated
    ({"decay_at": (0.0, 0.5), "warmup_steps": 10}, 100),    # a milestone at step 0
])
def test_schedule_matches_detectron2_at_every_step(changes, num_steps):
  optimizer = ml_collections.ConfigDict(r50_100pro_3x.get_config().optimizer.to_dict())
  optimizer.update(changes)
  steps = np.arange(num_steps + 2)
  schedule = jax.jit(jax.vmap(optim.learning_rate(optimizer, 16, num_steps)))
  got = np.asarray(schedule(steps.astype(np.int32)), np.float64)
  # float32: optax's linear form (I - E) * (1 - a) + E loses ~2e-6 on the first warmup steps.
  np.testing.assert_allclose(got, _detectron2_lr(optimizer, 16, num_steps, steps), rtol=3e-6)


def test_make_optimizer_carries_the_schedule_it_follows():
  config = r50_100pro_3x.get_config()
  params = {"w": np.ones(3, np.float32)}
  tx = optim.make_optimizer(config.optimizer, params, batch_size=16, num_steps=270_000,
                            is_frozen=lambda _: False)
  assert float(tx.schedule(0)) == pytest.approx(2.5e-7, rel=1e-5)
  state = tx.init(params)
  for step in range(3):  # a constant gradient: Adam's direction is 1, plus weight decay
    updates, state = tx.update({"w": np.ones(3, np.float32)}, state, params)
    np.testing.assert_allclose(updates["w"], -tx.schedule(step) * (1 + 1e-4), rtol=1e-4)


def test_a_nonfinite_gradient_moves_nothing_is_counted_and_the_count_resets():
  config = r50_100pro_3x.get_config()
  rng = np.random.default_rng(0)
  params = {"a": rng.standard_normal(3).astype(np.float32),
            "b": rng.standard_normal((2, 2)).astype(np.float32)}
  good = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
  bad = dict(good, b=np.float32([[1.0, np.nan], [np.inf, 2.0]]))
  tx = optim.make_optimizer(config.optimizer, params, batch_size=16, num_steps=270_000,
                            is_frozen=lambda _: False)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  updates, state = step(good, tx.init(params), params)
  params = optax.apply_updates(params, updates)
  assert int(optim.nonfinite_in_a_row(state)) == 0
  for count in (1, 2, 3):
    updates, new_state = step(bad, state, params)
    new_params = optax.apply_updates(params, updates)
    assert int(optim.nonfinite_in_a_row(new_state)) == count
    jax.tree.map(np.testing.assert_array_equal, new_params, params)
    jax.tree.map(np.testing.assert_array_equal, new_state.inner_state, state.inner_state)
    state = new_state
  updates, state = step(good, state, params)
  assert int(optim.nonfinite_in_a_row(state)) == 0
  assert int(optax.tree.get(state, "ScaleByAdamState").count) == 2  # skips did not count
  assert all(np.all(u != 0) for u in jax.tree.leaves(updates))


def _torch_adamw_step(p, g, lr, wd, b1, b2, eps, clip):
  """PyTorch AdamW's first step after full-model gradient-norm clipping, in NumPy."""
  norm = np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in g.values()))
  coef = min(1.0, clip / (norm + 1e-6))
  out = {}
  for k in p:
    grad = g[k] * coef
    m, v = (1 - b1) * grad, (1 - b2) * grad**2
    m_hat, v_hat = m / (1 - b1), v / (1 - b2)
    out[k] = p[k] * (1 - lr * wd) - lr * m_hat / (np.sqrt(v_hat) + eps)
  return out


def _stem_and_res2(path):
  return path[:2] in (("backbone", "stem"), ("backbone", "res2"))


def test_one_step_matches_pytorch_adamw_and_frozen_parts_never_move():
  config = r50_100pro_3x.get_config()
  rng = np.random.default_rng(0)
  params = {"backbone": {"stem": {"w": rng.standard_normal(3)},
                         "res2": {"w": rng.standard_normal(3)},
                         "res3": {"w": rng.standard_normal(4)}},
            "head": {"w": rng.standard_normal((2, 2))}}
  params = jax.tree.map(lambda x: x.astype(np.float32), params)
  grads = jax.tree.map(lambda x: (3 * rng.standard_normal(x.shape)).astype(np.float32), params)
  tx = optim.make_optimizer(config.optimizer, params, batch_size=16, num_steps=270_000,
                            is_frozen=_stem_and_res2)
  state = tx.init(params)
  for _ in range(3):  # frozen leaves stay put over several steps, weight decay included
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    for stage in ("stem", "res2"):
      np.testing.assert_array_equal(new["backbone"][stage]["w"], params["backbone"][stage]["w"])

  trainable = {"res3": params["backbone"]["res3"]["w"], "head": params["head"]["w"]}
  trainable_g = {"res3": grads["backbone"]["res3"]["w"], "head": grads["head"]["w"]}
  # The global norm that is clipped covers only trainable leaves; frozen grads are zero in
  # training anyway (stop_gradient), so this equals clipping the whole model.
  expected = _torch_adamw_step(trainable, trainable_g, lr=2.5e-7, wd=1e-4, b1=0.9, b2=0.999,
                               eps=1e-8, clip=1.0)
  tx = optim.make_optimizer(config.optimizer, params, batch_size=16, num_steps=270_000,
                            is_frozen=_stem_and_res2)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["backbone"]["res3"]["w"], expected["res3"], rtol=1e-6)
  np.testing.assert_allclose(new["head"]["w"], expected["head"], rtol=1e-6)


def test_frozen_labels_follow_the_models_predicate():
  params = {"backbone": {s: {"w": 0} for s in ("stem", "res2", "res3", "res4", "res5")},
            "fpn": {"w": 0}}
  for freeze_at, frozen in ((0, set()), (1, {"stem"}), (2, {"stem", "res2"})):
    config = tiny.get_config()
    config.model.backbone.freeze_at = freeze_at
    labels = optim.frozen_labels(params, detector.build_model(config.model).is_frozen)
    assert {s for s, v in labels["backbone"].items() if v["w"] == "frozen"} == frozen
    assert labels["fpn"]["w"] == "train"


def test_the_backbone_learns_at_its_multiplier_after_one_clip_of_everything():
  config = r50_100pro_3x.get_config()
  config.optimizer.backbone_multiplier = 0.1
  rng = np.random.default_rng(1)
  params = {"backbone": {"stem": {"w": rng.standard_normal(3)},
                         "res3": {"w": rng.standard_normal(4)}},
            "head": {"w": rng.standard_normal((2, 2))}}
  params = jax.tree.map(lambda x: x.astype(np.float32), params)
  grads = jax.tree.map(lambda x: (3 * rng.standard_normal(x.shape)).astype(np.float32), params)
  tx = optim.make_optimizer(config.optimizer, params, batch_size=16, num_steps=270_000,
                            is_frozen=lambda path: path[:2] == ("backbone", "stem"))
  updates, state = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new["backbone"]["stem"]["w"], params["backbone"]["stem"]["w"])
  trainable = {"res3": params["backbone"]["res3"]["w"], "head": params["head"]["w"]}
  trainable_g = {"res3": grads["backbone"]["res3"]["w"], "head": grads["head"]["w"]}
  adamw = dict(wd=1e-4, b1=0.9, b2=0.999, eps=1e-8, clip=1.0)
  head = _torch_adamw_step(trainable, trainable_g, lr=2.5e-7, **adamw)["head"]
  res3 = _torch_adamw_step(trainable, trainable_g, lr=2.5e-8, **adamw)["res3"]
  np.testing.assert_allclose(new["head"]["w"], head, rtol=1e-6)
  np.testing.assert_allclose(new["backbone"]["res3"]["w"], res3, rtol=1e-6)
  assert int(optim.nonfinite_in_a_row(state)) == 0
