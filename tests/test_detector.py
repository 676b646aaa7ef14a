"""The whole detector: normalization, a tiny forward, and whole-checkpoint conversion."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs import r50_100pro_3x
from configs import tiny
from sparse_rcnn_jax.convert import checkpoint_io
from sparse_rcnn_jax.model import detector
from sparse_rcnn_jax.model import official
from sparse_rcnn_jax.model.head_config import HeadConfig


@pytest.mark.parametrize("name, mean, std", [
    ("resnet", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),  # torchvision / official
    ("mobilenet_v2", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),  # torchvision
    ("efficientnet_lite", (127.0, 127.0, 127.0), (128.0, 128.0, 128.0))])  # TensorFlow Lite
def test_normalization_is_rgb_with_the_backbones_statistics(name, mean, std):
  config = tiny.get_config()
  config.model.backbone = ml_collections.ConfigDict(dict(name=name, variant=0, depth=18, width=8,
                                                         norm="frozen_bn", freeze_at=0))
  model = detector.build_model(config.model)
  image = np.zeros((1, 2, 2, 3), np.uint8)
  image[..., 0] = 255  # pure red
  out = np.asarray(detector.normalize_images(jnp.asarray(image), model.backbone.pixel_mean,
                                             model.backbone.pixel_std))[0, 0, 0]
  expected = [(255 - mean[0]) / std[0], -mean[1] / std[1], -mean[2] / std[2]]
  np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_tiny_detector_forward():
  config = tiny.get_config()
  model = detector.build_model(config.model)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (2, 64, 96, 3), np.uint8))
  whwh = jnp.array([[96.0, 64.0, 96.0, 64.0], [70.0, 50.0, 70.0, 50.0]])
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images, whwh)
  assert set(variables["params"]) == {"backbone", "fpn", "head"}
  out = jax.jit(model.apply)(variables, images, whwh)
  m = config.model
  assert out["pred_logits"].shape == (m.num_stages, 2, m.num_proposals, m.num_classes)
  assert out["pred_boxes"].shape == (m.num_stages, 2, m.num_proposals, 4)
  assert np.isfinite(np.asarray(out["pred_boxes"])).all()
  # Official init: every proposal is the whole (unpadded) image.
  np.testing.assert_allclose(np.asarray(out["proposal_boxes"])[1, 0], [0, 0, 70, 50])


def expected_official_names(depth: int, cfg: HeadConfig) -> set[str]:
  """The official checkpoint's tensor names, written out from docs/model.md, section 8."""
  norm = ("weight", "bias", "running_mean", "running_var")
  names = {"backbone.bottom_up.stem.conv1.weight"}
  names |= {f"backbone.bottom_up.stem.conv1.norm.{n}" for n in norm}
  blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
  for stage, count in zip(range(2, 6), blocks):
    for j in range(count):
      convs = ["conv1", "conv2", "conv3"] + (["shortcut"] if j == 0 else [])
      for c in convs:
        prefix = f"backbone.bottom_up.res{stage}.{j}.{c}"
        names |= {f"{prefix}.weight"} | {f"{prefix}.norm.{n}" for n in norm}
  for level in range(2, 6):
    for kind in ("lateral", "output"):
      names |= {f"backbone.fpn_{kind}{level}.weight", f"backbone.fpn_{kind}{level}.bias"}
  names |= {"init_proposal_features.weight", "init_proposal_boxes.weight"}
  for i in range(cfg.num_stages):
    p = f"head.head_series.{i}."
    names |= {p + n for n in ("self_attn.in_proj_weight", "self_attn.in_proj_bias",
                              "self_attn.out_proj.weight", "self_attn.out_proj.bias")}
    for layer in ("inst_interact.dynamic_layer", "inst_interact.out_layer", "linear1",
                  "linear2", "class_logits", "bboxes_delta", "inst_interact.norm1",
                  "inst_interact.norm2", "inst_interact.norm3", "norm1", "norm2", "norm3",
                  "cls_module.1", "reg_module.1", "reg_module.4", "reg_module.7"):
      names |= {p + layer + ".weight", p + layer + ".bias"}
    names |= {p + f"{m}.weight" for m in ("cls_module.0", "reg_module.0", "reg_module.3",
                                          "reg_module.6")}
  return names


@pytest.mark.parametrize("depth", [50])
def test_whole_official_checkpoint_round_trip(depth, tmp_path):
  config = r50_100pro_3x.get_config()
  config.model.backbone.depth = depth
  model = detector.build_model(config.model)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 64, 64, 3), jnp.uint8), jnp.ones((1, 4)))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  cfg = HeadConfig.from_config(config.model)

  state = official.to_official(variables, cfg, depth)
  assert set(state) == expected_official_names(depth, cfg)
  assert state["head.head_series.0.inst_interact.dynamic_layer.weight"].shape == (2 * 256 * 64,
                                                                                  256)
  assert state["head.head_series.0.inst_interact.out_layer.weight"].shape == (256, 49 * 256)

  checkpoint_io.save_state_dict(state, tmp_path / "model.npz")
  back = official.from_official(checkpoint_io.load_state_dict(tmp_path / "model.npz"), cfg,
                                depth)
  flat_a = traverse_util.flatten_dict(variables)
  flat_b = traverse_util.flatten_dict(back)
  assert set(flat_a) == set(flat_b)
  for k in flat_a:
    assert np.array_equal(flat_a[k], flat_b[k]), k


def test_pth_checkpoints_load_with_weights_only(tmp_path):
  torch = pytest.importorskip("torch")
  state = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
  checkpoint_io.save_state_dict(state, tmp_path / "m.pth")
  loaded = checkpoint_io.load_state_dict(tmp_path / "m.pth")
  np.testing.assert_array_equal(loaded["a.weight"], state["a.weight"])
  # A plain (torchvision-style) state dict, not wrapped under "model".
  torch.save({"b": torch.ones(2)}, tmp_path / "plain.pth")
  np.testing.assert_array_equal(checkpoint_io.load_state_dict(tmp_path / "plain.pth")["b"],
                                np.ones(2))


def test_checkpoint_io_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="No checkpoint file"):
    checkpoint_io.load_state_dict(tmp_path / "missing.pth")
  (tmp_path / "weights.bin").write_bytes(b"x")
  with pytest.raises(ValueError, match="expected a .pth"):
    checkpoint_io.load_state_dict(tmp_path / "weights.bin")


def test_head_config_takes_every_field_from_the_config_and_names_those_it_lacks():
  model = r50_100pro_3x.get_config().model.to_dict()
  head = HeadConfig.from_config(model, num_classes=3)
  assert head.num_classes == 3 and head.num_proposals == model["num_proposals"]
  assert {f: getattr(head, f) for f in ("hidden_dim", "dtype", "interaction")} == {
      f: model[f] for f in ("hidden_dim", "dtype", "interaction")}
  del model["canonical_box_size"], model["prior_prob"]
  with pytest.raises(ValueError, match=r"lacks \['canonical_box_size', 'prior_prob'\]"):
    HeadConfig.from_config(model)
