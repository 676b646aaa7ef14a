"""The head's research switches (the paper's ablations) and the interaction seam."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import r50_100pro_3x
from sparse_rcnn_jax.model import interactions
from sparse_rcnn_jax.model.dynamic_head import DynamicHead
from sparse_rcnn_jax.model.dynamic_head import proposal_boxes_init
from sparse_rcnn_jax.model.head_config import HeadConfig

TINY = HeadConfig.from_config(r50_100pro_3x.get_config().model, num_classes=3,
                              num_proposals=9, num_stages=2, hidden_dim=16, dim_feedforward=32,
                              num_heads=2, dim_dynamic=4)
WHWH = jnp.array([[96.0, 64.0, 96.0, 64.0], [80.0, 60.0, 80.0, 60.0]])


def _features(dim=16):
  key = jax.random.PRNGKey(0)
  return [jax.random.normal(jax.random.fold_in(key, s), (2, 64 // s, 96 // s, dim))
          for s in (4, 8, 16, 32)]


def _run(cfg):
  head = DynamicHead(cfg)
  variables = head.init(jax.random.PRNGKey(1), _features(cfg.hidden_dim), WHWH)
  return variables["params"], head.apply(variables, _features(cfg.hidden_dim), WHWH)


def _param_paths(params):
  return {"/".join(k) for k in traverse_util.flatten_dict(params)}


@pytest.mark.parametrize("name", sorted(interactions.INTERACTIONS))
def test_every_interaction_runs(name):
  params, out = _run(dataclasses.replace(TINY, interaction=name))
  assert out["pred_logits"].shape == (2, 2, 9, 3)
  assert out["pred_boxes"].shape == (2, 2, 9, 4)
  assert np.isfinite(np.asarray(out["pred_logits"])).all()
  assert any(p.startswith("stage0/inst_interact/") for p in _param_paths(params))


def test_dynamic_conv_matches_numpy_for_one_proposal():
  """The per-proposal dynamic convolution against a NumPy transcription of the official one."""
  cfg = TINY
  rng = np.random.default_rng(0)
  pro = rng.standard_normal(cfg.hidden_dim).astype(np.float32)
  roi = rng.standard_normal((49, cfg.hidden_dim)).astype(np.float32)
  module = interactions.DynamicConv(cfg)
  params = module.init(jax.random.PRNGKey(0), pro, roi)["params"]
  params = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32),
                        params)
  ours = np.asarray(module.apply({"params": params}, pro, roi))

  p = jax.tree.map(np.asarray, params)
  def ln(x, norm):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * norm["scale"] + norm["bias"]
  dyn = pro @ p["dynamic_layer"]["kernel"] + p["dynamic_layer"]["bias"]
  d, dd = cfg.hidden_dim, cfg.dim_dynamic
  x = np.maximum(ln(roi @ dyn[:d * dd].reshape(d, dd), p["norm1"]), 0)
  x = np.maximum(ln(x @ dyn[d * dd:].reshape(dd, d), p["norm2"]), 0)
  x = x.reshape(-1) @ p["out_layer"]["kernel"] + p["out_layer"]["bias"]
  np.testing.assert_allclose(ours, np.maximum(ln(x, p["norm3"]), 0), rtol=1e-4, atol=1e-5)


def test_a_new_interaction_is_one_module_and_one_config_value(monkeypatch):
  class MeanPool(nn.Module):
    cfg: HeadConfig

    @nn.compact
    def __call__(self, proposal_feature, roi_feature):
      return nn.Dense(self.cfg.hidden_dim)(proposal_feature + roi_feature.mean(0))

  monkeypatch.setitem(interactions.INTERACTIONS, "mean_pool", MeanPool)
  params, out = _run(dataclasses.replace(TINY, interaction="mean_pool"))
  assert "stage1/inst_interact/Dense_0/kernel" in _param_paths(params)
  assert np.isfinite(np.asarray(out["pred_boxes"])).all()


def test_unknown_interaction_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown interaction 'nope'"):
    _run(dataclasses.replace(TINY, interaction="nope"))


def test_self_attention_off_removes_it():
  params, _ = _run(dataclasses.replace(TINY, self_attention=False))
  removed = {p for p in _param_paths(params) if "/self_attn/" in p or "/norm1/" in p}
  assert removed == {f"stage{i}/inst_interact/norm1/{v}" for i in (0, 1)
                     for v in ("scale", "bias")}
  assert "stage0/self_attn/query/kernel" in _param_paths(_run(TINY)[0])


@pytest.mark.parametrize("reuse", [True, False])
def test_feature_reuse_switch(reuse):
  """Without feature reuse, stage 1 does not see stage 0's object features at all."""
  cfg = dataclasses.replace(TINY, feature_reuse=reuse)
  head = DynamicHead(cfg)
  feats = _features()
  params = head.init(jax.random.PRNGKey(1), feats, WHWH)["params"]
  grad = jax.grad(lambda p: head.apply({"params": p}, feats, WHWH)["pred_logits"][1].sum())(
      params)
  stage0 = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad["stage0"]))
  assert (stage0 > 0) == reuse


def test_proposal_inits():
  key = jax.random.PRNGKey(0)
  image = np.asarray(proposal_boxes_init("image")(key, (5, 4)))
  np.testing.assert_array_equal(image, np.tile([0.5, 0.5, 1.0, 1.0], (5, 1)))
  center = np.asarray(proposal_boxes_init("center")(key, (5, 4)))
  np.testing.assert_allclose(center, np.tile([0.5, 0.5, 0.1, 0.1], (5, 1)))
  grid = np.asarray(proposal_boxes_init("grid")(key, (16, 4)))
  # A 4x4 grid of quarter-size boxes tiles the unit square exactly.
  np.testing.assert_allclose(np.sort(np.unique(grid[:, 0])), [0.125, 0.375, 0.625, 0.875])
  np.testing.assert_allclose(grid[:, 2:], 0.25)
  assert len({tuple(b) for b in grid[:, :2]}) == 16
  random = np.asarray(proposal_boxes_init("random")(key, (100, 4)))
  assert random.min() >= 0.01 and random.max() <= 1.0 and random.std() > 0.05
  with pytest.raises(ValueError, match="proposal_init"):
    proposal_boxes_init("corner")(key, (2, 4))


def test_proposals_scale_to_each_image():
  cfg = dataclasses.replace(TINY, proposal_init="center")
  _, out = _run(cfg)
  expected = np.array([[43.2, 28.8, 52.8, 35.2], [36.0, 27.0, 44.0, 33.0]])
  np.testing.assert_allclose(np.asarray(out["proposal_boxes"])[:, 0], expected, rtol=1e-6)
