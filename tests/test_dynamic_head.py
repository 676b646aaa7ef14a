"""The dynamic head against outputs of the official PyTorch head (shared/reference)."""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import r50_100pro_3x
from sparse_rcnn_jax.convert import checkpoint_io
from sparse_rcnn_jax.evaluation import postprocess
from sparse_rcnn_jax.model import official
from sparse_rcnn_jax.model.dynamic_head import DynamicHead
from sparse_rcnn_jax.model.dynamic_head import HeadStage
from sparse_rcnn_jax.model.head_config import HeadConfig


def reference_head_config(reference_dir) -> HeadConfig:
  meta = json.loads((reference_dir / "sparse_rcnn_dev.json").read_text())["MODEL.SparseRCNN"]
  return HeadConfig.from_config(
      r50_100pro_3x.get_config().model, num_classes=meta["NUM_CLASSES"],
      num_proposals=meta["NUM_PROPOSALS"], num_stages=meta["NUM_HEADS"],
      hidden_dim=meta["HIDDEN_DIM"], dim_feedforward=meta["DIM_FEEDFORWARD"],
      num_heads=meta["NHEADS"], dim_dynamic=meta["DIM_DYNAMIC"], num_cls_layers=meta["NUM_CLS"],
      num_reg_layers=meta["NUM_REG"], prior_prob=meta["PRIOR_PROB"])


@functools.cache
def _load(reference_dir):
  io = dict(np.load(reference_dir / "sparse_rcnn_dev_io.npz"))
  cfg = reference_head_config(reference_dir)
  state = checkpoint_io.load_state_dict(reference_dir / "sparse_rcnn_dev_params.npz")
  params = official.head_from_official(state, cfg)
  features = [jnp.asarray(io[f"inputs/p{l}"].astype(np.float32).transpose(0, 2, 3, 1))
              for l in range(2, 6)]
  whwh = jnp.asarray(io["inputs/images_whwh"])
  outputs, state = jax.jit(
      lambda p, f, w: DynamicHead(cfg).apply({"params": p}, f, w, mutable=["intermediates"]))(
          params, features, whwh)
  inter = jax.tree.map(np.asarray, state["intermediates"])
  return cfg, io, params, features, whwh, jax.tree.map(np.asarray, outputs), inter


@pytest.fixture(scope="module")
def run(reference_dir):
  return _load(reference_dir)


# Chained stages: float32 differences in a stage's boxes (~1e-6 relative, from summation
# order) are amplified by bilinear sampling in the next stage's RoIAlign.
CHAINED_RTOL = 1e-4


def assert_close(actual, expected, name, rtol=1e-5):
  """Agreement to ~rtol relative to the array's magnitude (float32 sums differ in order)."""
  scale = max(float(np.abs(expected).max()), 1e-6)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=name)


def test_proposal_boxes(run):
  _, io, _, _, _, outputs, _ = run
  assert_close(outputs["proposal_boxes"], io["inputs/proposal_boxes_xyxy"], "proposals")


@pytest.mark.parametrize("stage", [0, 1])
def test_stage_matches_official_on_its_inputs(run, stage):
  """Each stage fed the official inputs of that stage: every intermediate agrees to ~1e-5."""
  cfg, io, params, features, _, _, _ = run
  b, n, d = 2, cfg.num_proposals, cfg.hidden_dim
  ref = lambda k: io[f"stage{stage}/{k}"]
  if stage == 0:
    proposal_features = jnp.broadcast_to(params["proposal_features"][None], (b, n, d))
  else:
    proposal_features = jnp.asarray(io[f"stage{stage - 1}/obj_features"].reshape(b, n, d))
  (logits, boxes, obj), state = HeadStage(cfg).apply(
      {"params": params[f"stage{stage}"]}, features, jnp.asarray(ref("boxes_in")),
      proposal_features, mutable=["intermediates"])
  ours = {k: np.asarray(v[0]) for k, v in state["intermediates"].items()}
  np.testing.assert_array_equal(ours["level_assignments"].reshape(-1), ref("level_assignments"))
  assert_close(ours["roi_features"].reshape(b * n, 7, 7, d).transpose(0, 3, 1, 2),
               ref("roi_features"), "roi_features", rtol=2e-5)
  assert_close(ours["self_attn_out"].transpose(1, 0, 2), ref("self_attn_out"), "self_attn_out")
  assert_close(ours["interaction_out"].reshape(b * n, d), ref("dynconv_out"), "dynconv_out",
               rtol=2e-5)
  assert_close(np.asarray(obj).reshape(1, b * n, d), ref("obj_features"), "obj_features",
               rtol=2e-5)
  assert_close(np.asarray(logits), ref("pred_logits"), "pred_logits")
  assert_close(np.asarray(boxes), ref("pred_boxes"), "pred_boxes")


def test_whole_head_matches_official(run):
  """All stages chained. Float32 box differences (~1e-6 relative) grow through bilinear
  sampling in later stages, so the chained tolerance is looser than the per-stage one."""
  cfg, io, _, _, _, outputs, inter = run
  for stage in range(cfg.num_stages):
    ref = lambda k: io[f"stage{stage}/{k}"]
    ours = inter[f"stage{stage}"]
    assert_close(ours["boxes_in"][0], ref("boxes_in"), "boxes_in", CHAINED_RTOL)
    np.testing.assert_array_equal(ours["level_assignments"][0].reshape(-1),
                                  ref("level_assignments"))
    assert_close(ours["roi_features"][0].transpose(0, 1, 4, 2, 3).reshape(-1, cfg.hidden_dim, 7, 7),
                 ref("roi_features"), "roi_features", rtol=3e-4)
    assert_close(outputs["pred_logits"][stage], ref("pred_logits"), "pred_logits", CHAINED_RTOL)
    assert_close(outputs["pred_boxes"][stage], ref("pred_boxes"), "pred_boxes", CHAINED_RTOL)


def test_detections_match_official(run):
  _, io, _, _, whwh, outputs, _ = run
  sizes = io["inputs/image_sizes_hw"]
  det = jax.tree.map(np.asarray, postprocess.postprocess(
      outputs["pred_logits"][-1], outputs["pred_boxes"][-1], whwh, sizes))
  for b in range(2):
    sorted_ref = {k: io[f"det_sorted/img{b}/{k}"]
                  for k in ("scores", "pred_classes", "pred_boxes", "proposal_index")}
    assert_close(det["scores"][b], sorted_ref["scores"], "scores", CHAINED_RTOL)
    np.testing.assert_array_equal(det["labels"][b], sorted_ref["pred_classes"])
    np.testing.assert_array_equal(det["proposal_index"][b], sorted_ref["proposal_index"])
    post = {k: io[f"det_post/img{b}/{k}"] for k in ("scores", "pred_classes", "pred_boxes")}
    order = np.argsort(-post["scores"], kind="stable")
    valid = det["valid"][b]
    assert valid.sum() == len(post["scores"])
    assert_close(det["scores"][b][valid], post["scores"][order], "post scores", CHAINED_RTOL)
    np.testing.assert_array_equal(det["labels"][b][valid], post["pred_classes"][order])
    assert_close(det["boxes"][b][valid], post["pred_boxes"][order], "post boxes", CHAINED_RTOL)


def test_converter_round_trip_is_exact(run, reference_dir):
  cfg, _, params, *_ = run
  state = checkpoint_io.load_state_dict(reference_dir / "sparse_rcnn_dev_params.npz")
  back = official.head_to_official(params, cfg)
  assert set(back) == set(state)
  for k in state:
    assert back[k].shape == state[k].shape and np.array_equal(back[k], state[k]), k


def test_converter_names_missing_and_unexpected_tensors(run, reference_dir):
  cfg = run[0]
  state = checkpoint_io.load_state_dict(reference_dir / "sparse_rcnn_dev_params.npz")
  missing = {k: v for k, v in state.items() if "stage" not in k and "norm3" not in k}
  with pytest.raises(ValueError, match="lacks"):
    official.head_from_official(missing, cfg)
  with pytest.raises(ValueError, match="head_series.1"):
    official.head_from_official(state, HeadConfig(**{**cfg.__dict__, "num_stages": 1}))
  wrong = dict(state, **{"init_proposal_boxes.weight": np.zeros((3, 4), np.float32)})
  with pytest.raises(ValueError, match="expected shape"):
    official.head_from_official(wrong, cfg)


def test_permuting_proposals_permutes_outputs(run):
  cfg, _, params, features, whwh, outputs, _ = run
  perm = np.random.default_rng(0).permutation(cfg.num_proposals)
  permuted = dict(params, proposal_boxes=params["proposal_boxes"][perm],
                  proposal_features=params["proposal_features"][perm])
  out = DynamicHead(cfg).apply({"params": permuted}, features, whwh)
  for key in ("pred_logits", "pred_boxes"):
    assert_close(np.asarray(out[key]), outputs[key][:, :, perm], key, CHAINED_RTOL)


def test_jit_and_eager_agree(run):
  cfg, _, params, features, whwh, outputs, _ = run
  with jax.disable_jit():
    eager = DynamicHead(cfg).apply({"params": params}, features, whwh)
  for key in ("pred_logits", "pred_boxes"):
    assert_close(np.asarray(eager[key]), outputs[key], key, CHAINED_RTOL)


def test_canonical_box_size_sets_the_pooling_level(run):
  """model.canonical_box_size (official 224) moves boxes between FPN levels as in detectron2:
  level = clamp(floor(4 + log2(sqrt(area) / size)), 2, 5)."""
  cfg, io, params, features, whwh, _, _ = run
  small = dataclasses.replace(cfg, canonical_box_size=28.0)
  _, state = DynamicHead(small).apply({"params": params}, features, whwh,
                                      mutable=["intermediates"])
  inter = state["intermediates"]
  levels = np.asarray(inter["stage0"]["level_assignments"][0]).reshape(-1)
  b = np.asarray(inter["stage0"]["boxes_in"][0], np.float64).reshape(-1, 4)
  side = np.sqrt(np.maximum((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]), 0))
  expected = np.clip(np.floor(4 + np.log2(side / 28.0 + 1e-8)), 2, 5) - 2
  np.testing.assert_array_equal(levels, expected)
  # A smaller canonical size sends boxes to coarser levels than the official 224 does.
  official = io["stage0/level_assignments"].reshape(-1)
  assert (levels >= official).all() and (levels > official).any()
