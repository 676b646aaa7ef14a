"""bfloat16 compute (config.model.dtype): what runs in bfloat16, what stays float32, and how
close the bfloat16 model is to the float32 one on the same weights.

Tolerance. bfloat16 keeps 8 significant bits: one rounding is off by at most 2^-9 (0.2 %)
relative. The errors of the layers between the input and an output add up roughly as a random
walk, so a network of some 60 layers (R-50, FPN, six head stages) lands near sqrt(60) x 0.2 %
~ 1.5 % relative RMS when nothing is amplified. We allow 3 % (RMS over the whole output,
relative to the float32 output's RMS) on logits and 1 % on boxes. Measured here: whole tiny
and R-50 models, logits 0.1-0.7 % and boxes 0.04-0.26 % (later stages more); the official
head's stages on their reference inputs, logits 0.13-0.16 % and boxes 0.3-0.5 % (their maps
are noise, where a box's rounding moves what it reads most). A test that compared elementwise
would fail on the few proposals whose box straddles an FPN level boundary and is pooled from
the other level in one of the two runs; such jumps exist in float32 too when the summation
order changes.

Random initial weights make box deltas of order 1 in every stage, which chains exponential box
growth through the stages: the float32 model is then itself chaotic (a relative change of
1e-7 in a stage's input moves later boxes by pixels), so comparing two precisions measures the
chaos, not the precision. `_calm` scales the box-delta layer down 20x, as training does (a
trained model's later stages make small corrections), leaving every other weight random.
"""
import dataclasses

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import r50_100pro_3x, synthetic, tiny
from sparse_rcnn_jax.model import detector
from sparse_rcnn_jax.model import precision
from sparse_rcnn_jax.model.dynamic_head import HeadStage
from sparse_rcnn_jax.training import model_state
from sparse_rcnn_jax.training import trainer

LOGITS_RTOL = 0.03
BOXES_RTOL = 0.01


def relative_rms_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.sqrt(np.mean((actual - expected)**2) / np.mean(expected**2)))


def _calm(variables: dict) -> dict:
  flat = traverse_util.flatten_dict(variables)
  return traverse_util.unflatten_dict(
      {k: v * 0.05 if "bboxes_delta" in k else v for k, v in flat.items()})


def _model(module, dtype: str, **model_overrides) -> detector.SparseRCNN:
  config = module.get_config()
  config.model.update(dtype=dtype, **model_overrides)
  return detector.build_model(config.model)


def _images(batch: int, height: int, width: int):
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8))
  sizes = [(width - 16 * b, height - 16 * b) for b in range(batch)]
  whwh = jnp.asarray([[w, h, w, h] for w, h in sizes], jnp.float32)
  return images, whwh


def _eqns(jaxpr, stack: str = ""):
  """(equation, its full name stack) of `jaxpr` and every nested jaxpr, depth first."""
  for eqn in jaxpr.eqns:
    name = f"{stack}/{eqn.source_info.name_stack}"
    yield eqn, name
    for sub in jax_core.jaxprs_in_params(eqn.params):
      yield from _eqns(sub, name)


def _dtypes_in(jaxpr) -> set[str]:
  """Every dtype produced by an equation of `jaxpr` or of the jaxprs nested in it."""
  return {str(v.aval.dtype) for eqn, _ in _eqns(jaxpr) for v in eqn.outvars
          if hasattr(v.aval, "dtype")}


def test_unknown_dtype_is_reported():
  with pytest.raises(ValueError, match="model.dtype must be one of"):
    precision.compute_dtype("float16")


def test_bfloat16_computes_in_bfloat16_and_keeps_variables_and_outputs_float32():
  model = _model(tiny, "bfloat16", backbone=dict(depth=18, width=16, norm="frozen_bn",
                                                  freeze_at=2))
  images, whwh = _images(2, 64, 96)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images, whwh)
  assert set(variables) == {"params", "batch_stats"}
  assert {str(x.dtype) for x in jax.tree.leaves(variables)} == {"float32"}
  out = jax.jit(model.apply)(variables, images, whwh)
  assert {k: str(v.dtype) for k, v in out.items()} == {
      "pred_logits": "float32", "pred_boxes": "float32", "proposal_boxes": "float32"}
  # The convolutions and matrix products really run on bfloat16 operands.
  jaxpr = jax.make_jaxpr(model.apply)(variables, images, whwh).jaxpr
  kinds = {(eqn.primitive.name, str(eqn.invars[0].aval.dtype))
           for eqn, _ in _eqns(jaxpr) if eqn.invars}
  assert ("conv_general_dilated", "bfloat16") in kinds
  assert ("dot_general", "bfloat16") in kinds
  assert ("conv_general_dilated", "float32") not in kinds


def test_float32_model_has_no_bfloat16():
  model = _model(tiny, "float32")
  images, whwh = _images(1, 64, 64)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images, whwh)
  assert "bfloat16" not in _dtypes_in(jax.make_jaxpr(model.apply)(variables, images, whwh).jaxpr)


@pytest.mark.parametrize("stage", [0, 1])
def test_head_stage_in_bfloat16_agrees_with_the_official_float32_stage(reference_dir, stage):
  """Each stage on the official stage's own inputs (the reference FPN maps are i.i.d. noise, so
  sampling them is not smooth: a box moved by a fraction of a pixel reads other values, and
  a chained comparison would measure that, not the precision)."""
  from tests.test_dynamic_head import _load  # pylint: disable=g-import-not-at-top
  cfg, io, params, features, _, _, _ = _load(reference_dir)
  b, n, d = io["inputs/proposal_boxes_xyxy"].shape[:2] + (cfg.hidden_dim,)
  if stage == 0:
    proposal_features = jnp.broadcast_to(params["proposal_features"][None], (b, n, d))
  else:
    proposal_features = jnp.asarray(io[f"stage{stage - 1}/obj_features"].reshape(b, n, d))
  bfloat16 = HeadStage(dataclasses.replace(cfg, dtype="bfloat16"))
  logits, boxes, _ = jax.jit(bfloat16.apply)(
      {"params": params[f"stage{stage}"]}, [f.astype(jnp.bfloat16) for f in features],
      jnp.asarray(io[f"stage{stage}/boxes_in"]), proposal_features)
  assert logits.dtype == boxes.dtype == jnp.float32
  expected_logits, expected_boxes = io[f"stage{stage}/pred_logits"], io[f"stage{stage}/pred_boxes"]
  assert relative_rms_error(logits, expected_logits) < LOGITS_RTOL
  assert relative_rms_error(boxes, expected_boxes) < BOXES_RTOL
  # Not the float32 function by accident: bfloat16 rounding shows.
  assert not np.allclose(logits, expected_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module,hw", [
    (tiny, (128, 160)),
    pytest.param(r50_100pro_3x, (128, 160), marks=pytest.mark.slow)],  # R-50 compiles twice
                         ids=["tiny", "r50_100pro"])
def test_whole_model_in_bfloat16_agrees_with_float32(module, hw):
  images, whwh = _images(2, *hw)
  float32, bfloat16 = _model(module, "float32"), _model(module, "bfloat16")
  variables = _calm(jax.jit(float32.init)(jax.random.PRNGKey(0), images, whwh))
  expected = jax.jit(float32.apply)(variables, images, whwh)
  actual = jax.jit(bfloat16.apply)(variables, images, whwh)
  for s in range(expected["pred_logits"].shape[0]):
    logits = relative_rms_error(actual["pred_logits"][s], expected["pred_logits"][s])
    boxes = relative_rms_error(actual["pred_boxes"][s], expected["pred_boxes"][s])
    assert logits < LOGITS_RTOL and boxes < BOXES_RTOL, (s, logits, boxes)
    assert logits > 0  # the two runs differ: bfloat16 was used


def test_losses_and_matching_costs_are_float32_in_the_train_step():
  config = synthetic.get_config("scratch")
  config.model.update(dtype="bfloat16", num_proposals=8, num_stages=2, hidden_dim=32,
                      dim_feedforward=64, num_heads=2, dim_dynamic=8, num_classes=3)
  config.model.backbone.width = 8
  config.data.max_boxes = 4
  model = detector.build_model(config.model)
  images, whwh = _images(2, 64, 64)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images, whwh)
  state = model_state.create_state(model, variables,
                                   model_state.optimizer(model, config, variables["params"]), 0)
  batch = {"image": images, "image_whwh": whwh,
           "gt_boxes": jnp.tile(jnp.array([[4.0, 4.0, 40.0, 40.0]]), (2, 4, 1)),
           "gt_labels": jnp.zeros((2, 4), jnp.int32),
           "gt_mask": jnp.array([[True, True, False, False], [True, False, False, False]])}
  step = lambda s, b: trainer.train_step(s, b, model=model, loss_config=config.loss, mesh=None,
                                         schedule=state.tx.schedule)
  jaxpr = jax.make_jaxpr(step)(state, batch).jaxpr
  # losses.set_prediction_loss names its ops' scopes "set_prediction_loss" and ".../matching".
  in_loss = [(eqn, name) for eqn, name in _eqns(jaxpr) if "set_prediction_loss" in name]
  in_matching = [name for _, name in in_loss if "matching" in name]
  assert in_loss and in_matching, "the loss and matching scopes were not found"
  for eqn, name in in_loss:
    for var in eqn.outvars:
      assert str(var.aval.dtype) != "bfloat16", (name, eqn)
  # Outside the loss the model computes in bfloat16, so the check above can fail.
  assert "bfloat16" in _dtypes_in(jaxpr)
