"""Optimizer: schedule values, one AdamW step against PyTorch's formula, frozen masking."""
import jax
import numpy as np
import optax
import pytest

from configs import r50_100pro_3x
from configs import tiny
from sparse_rcnn_jax import detector
from sparse_rcnn_jax import optim


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
