"""Model EMA (sparse_rcnn_jax/training/ema.py) against a NumPy loop, alone and inside the train step.

Resuming with an EMA is checked in tests/test_trainer.py (the worker keeps one), evaluation
with and without it in tests/test_cli.py.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import tiny
from sparse_rcnn_jax import sharding
from sparse_rcnn_jax.model import detector
from sparse_rcnn_jax.training import ema as ema_lib
from sparse_rcnn_jax.training import model_state
from sparse_rcnn_jax.training import trainer


def _numpy_ema(start: np.ndarray, params_after: list[np.ndarray], decay: float,
               warmup: int) -> np.ndarray:
  """DiffusionDet's rule in float64: ema = d * ema + (1 - d) * params after each update."""
  ema = np.asarray(start, np.float64)
  for t, params in enumerate(params_after, start=1):
    d = decay * (1 - math.exp(-t / warmup)) if warmup else decay
    ema = d * ema + (1 - d) * np.asarray(params, np.float64)
  return ema


@pytest.mark.parametrize("decay,warmup", [(0.999, 0), (0.9, 0), (0.9998, 3)])
def test_update_equals_a_numpy_loop(decay, warmup):
  rng = np.random.default_rng(0)
  start = rng.normal(size=(5, 3)).astype(np.float32)
  params_after = [start + rng.normal(size=start.shape).astype(np.float32) * (t + 1)
                  for t in range(6)]
  rule = ema_lib.EMA(decay, warmup)
  ema = {"w": jnp.asarray(start), "frozen": jnp.asarray(start)}
  for t, params in enumerate(params_after, start=1):
    ema = rule.update(ema, {"w": jnp.asarray(params), "frozen": jnp.asarray(start)}, t)
  np.testing.assert_allclose(ema["w"], _numpy_ema(start, params_after, decay, warmup),
                             rtol=1e-5, atol=1e-6)
  # A parameter that never moves stays bit-exact.
  np.testing.assert_array_equal(ema["frozen"], start)


def test_warmup_decay_starts_near_zero_and_approaches_decay():
  rule = ema_lib.EMA(0.9998, 2000)
  np.testing.assert_allclose(rule.decay_at(1), 0.9998 * (1 - math.exp(-1 / 2000)), rtol=1e-5)
  np.testing.assert_allclose(rule.decay_at(100_000), 0.9998, rtol=1e-7)
  assert float(ema_lib.EMA(0.999).decay_at(1)) == pytest.approx(0.999)


def test_config_errors_and_off():
  train = ml_collections.ConfigDict(dict(ema_decay=0.0, ema_warmup_steps=0))
  assert ema_lib.from_config(train) is None
  for decay in (1.0, 1.5, -0.1):
    with pytest.raises(ValueError, match="ema_decay must be in"):
      ema_lib.from_config(ml_collections.ConfigDict(dict(ema_decay=decay, ema_warmup_steps=0)))
  with pytest.raises(ValueError, match="ema_warmup_steps"):
    ema_lib.from_config(ml_collections.ConfigDict(dict(ema_decay=0.9, ema_warmup_steps=-1)))


def _tiny_config(ema_decay: float, warmup: int = 0):
  config = tiny.get_config()
  config.model.update(num_classes=3, num_stages=1)  # one stage compiles in half the time
  config.train.update(ema_decay=ema_decay, ema_warmup_steps=warmup, num_steps=10)
  config.optimizer.update(warmup_steps=0, base_learning_rate=1e-3)
  return config


def _batch(step: int) -> dict:
  rng = np.random.default_rng(step)
  boxes = np.zeros((2, 20, 4), np.float32)
  boxes[:, :2] = [[4, 6, 40, 50], [30, 20, 60, 62]]
  return {"image": jnp.asarray(rng.integers(0, 255, (2, 64, 64, 3), np.uint8)),
          "image_whwh": jnp.full((2, 4), 64.0),
          "orig_size": jnp.full((2, 2), 64, jnp.int32), "image_id": jnp.arange(2),
          "gt_boxes": jnp.asarray(boxes), "gt_labels": jnp.zeros((2, 20), jnp.int32),
          "gt_mask": jnp.asarray(np.arange(20) < 2)[None].repeat(2, 0),
          "valid": jnp.ones((2,), bool)}


def test_train_steps_keep_the_numpy_average_of_the_parameters():
  config = _tiny_config(0.9, warmup=2)
  model = detector.build_model(config.model)
  mesh = sharding.make_mesh(jax.devices()[:1])
  # On the mesh from the start, as the trainer places them: the step compiles once.
  state = jax.device_put(model_state.new_state(model, config), sharding.replicated(mesh))
  start = jax.device_get(state.params)
  assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(state.ema_params), start))
  step_fn = trainer.make_train_step(model, config, mesh, state)
  history = []
  for step in range(4):
    state, _ = step_fn(state, jax.device_put(_batch(step), sharding.batch_sharded(mesh)))
    history.append(jax.device_get(state.params))
  leaves = jax.tree.leaves_with_path(jax.device_get(state.ema_params))
  assert leaves
  moved = 0
  for path, ours in leaves:
    expected = _numpy_ema(_get(start, path), [_get(p, path) for p in history], 0.9, 2)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6, err_msg=str(path))
    moved += not np.array_equal(ours, _get(history[-1], path))
  assert moved, "the average equals the parameters: nothing was averaged"
  variables = state.eval_variables()
  assert variables["params"] is state.ema_params
  assert state.eval_variables(use_ema=False)["params"] is state.params


def _get(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_without_ema_the_state_keeps_none_and_evaluates_the_parameters():
  config = _tiny_config(0.0)
  model = detector.build_model(config.model)
  state = model_state.new_state(model, config)
  assert not state.ema_params
  assert state.eval_variables()["params"] is state.params
