"""The backbone seam: a backbone registered by name sets the pyramid of the FPN and RoIAlign and
the optimizer's frozen parameters; an unknown name is refused with the choices."""
import pathlib
import sys
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import custom
from configs import tiny
from sparse_rcnn_jax.model import backbones
from sparse_rcnn_jax.model import detector
from sparse_rcnn_jax.model.fpn import FPN
from sparse_rcnn_jax.model.roi_align import multilevel_roi_align

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import bench_backbones, bench_train_step  # pylint: disable=g-import-not-at-top,wrong-import-position


class TwoConvs(nn.Module):
  """A toy backbone with levels 3 and 4 only: an 8x8/8 conv "fine" (P3), then a 3x3/2 conv
  "coarse" (P4). `frozen_fine` freezes "fine" through the optimizer's mask alone (it still
  gets gradients), so a frozen parameter that stays put shows the mask comes from here."""
  channels: int = 8
  frozen_fine: bool = True
  conv_impl: str = "auto"
  dtype: str = "float32"

  pixel_mean: ClassVar[tuple[float, float, float]] = (100.0, 110.0, 120.0)
  pixel_std: ClassVar[tuple[float, float, float]] = (50.0, 60.0, 70.0)

  @classmethod
  def from_config(cls, backbone: ml_collections.ConfigDict, *, dtype: str,
                  conv_impl: str) -> "TwoConvs":
    return cls(backbone.channels, backbone.frozen_fine, conv_impl, dtype)

  @property
  def levels(self) -> tuple[int, ...]:
    return (3, 4)

  @property
  def size_divisibility(self) -> int:
    return 16

  def is_frozen(self, path: tuple[str, ...]) -> bool:
    return self.frozen_fine and path[0] == "fine"

  def pretrained(self, weights: str) -> dict:
    raise ValueError(f"TwoConvs has no pretrained weights ({weights}).")

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[int, jax.Array]:
    """x: [B, H, W, 3] -> {3: [B, H/8, W/8, C], 4: [B, H/16, W/16, 2C]}."""
    self.sow("intermediates", "pixels", x)
    fine = nn.relu(nn.Conv(self.channels, (8, 8), strides=8, name="fine")(x))
    coarse = nn.relu(nn.Conv(2 * self.channels, (3, 3), strides=2, name="coarse")(fine))
    return {3: fine, 4: coarse}


@pytest.fixture
def toy_config(monkeypatch):
  """The tiny config with `model.backbone.name = "two_convs"`, registered for this test only."""
  monkeypatch.setitem(backbones.BACKBONES, "two_convs", TwoConvs)
  config = tiny.get_config()
  config.model.backbone = ml_collections.ConfigDict(
      dict(name="two_convs", channels=8, frozen_fine=True))
  return config


def test_unknown_name_lists_the_choices():
  config = tiny.get_config()
  config.model.backbone.name = "vgg"
  with pytest.raises(ValueError, match=r"backbone.name 'vgg'.*\['efficientnet_lite', 'mobilenet_v2', 'resnet'\]"):
    detector.build_model(config.model)


def test_resnet_is_the_default_with_levels_2_to_5():
  model = detector.build_model(tiny.get_config().model)
  assert type(model.backbone) is backbones.BACKBONES["resnet"]
  assert model.backbone.levels == (2, 3, 4, 5)


def _spread_proposals(params, num: int, seed: int = 0):
  """Proposals of many sizes (normalized cxcywh), so that boxes fall on both levels."""
  rng = np.random.default_rng(seed)
  boxes = np.concatenate([rng.uniform(0.3, 0.7, (num, 2)), rng.uniform(0.05, 1.0, (num, 2))], 1)
  return dict(params, head=dict(params["head"], proposal_boxes=jnp.asarray(boxes, jnp.float32)))


def test_fpn_and_roi_align_use_the_backbones_levels(toy_config):
  config = toy_config
  config.model.canonical_box_size = 48.0  # the image's boxes then span P3 and P4
  model = detector.build_model(config.model)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 64, 96, 3), np.uint8))
  whwh = jnp.array([[96.0, 64.0, 96.0, 64.0], [80.0, 60.0, 80.0, 60.0]])
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images, whwh)
  assert set(variables["params"]) == {"backbone", "fpn", "head"}
  assert set(variables["params"]["fpn"]) == {"fpn_lateral3", "fpn_output3", "fpn_lateral4",
                                             "fpn_output4"}
  variables["params"] = _spread_proposals(variables["params"], config.model.num_proposals)

  _, state = jax.jit(lambda v: model.apply(
      v, images, whwh, capture_intermediates=lambda m, _: isinstance(m, FPN),
      mutable=["intermediates"]))(variables)
  found = state["intermediates"]
  (maps,) = found["fpn"]["__call__"]
  assert [m.shape[1:3] for m in maps] == [(8, 12), (4, 6)]  # strides 8 and 16
  cfg = model.head
  for stage in range(cfg.num_stages):
    head = found["head"][f"stage{stage}"]
    boxes = head["boxes_in"][0]
    size = np.sqrt(np.prod(np.asarray(boxes[..., 2:] - boxes[..., :2], np.float64), -1))
    expected = np.clip(np.floor(4 + np.log2(size / 48.0 + 1e-8)), 3, 4) - 3
    np.testing.assert_array_equal(head["level_assignments"][0], expected)
    if stage == 0:
      assert set(expected.ravel()) == {0, 1}
    roi, _ = multilevel_roi_align(maps, boxes, levels=(3, 4), output_size=cfg.pooler_resolution,
                                  sampling_ratio=cfg.sampling_ratio,
                                  canonical_box_size=cfg.canonical_box_size)
    np.testing.assert_allclose(head["roi_features"][0], roi, rtol=1e-5, atol=1e-5)


def test_pixels_are_normalized_with_the_backbones_statistics(toy_config):
  model = detector.build_model(toy_config.model)
  images = np.random.default_rng(0).integers(0, 256, (1, 32, 48, 3), np.uint8)
  whwh = jnp.array([[48.0, 32.0, 48.0, 32.0]])
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images, whwh)
  _, state = model.apply(variables, images, whwh, mutable=["intermediates"])
  (pixels,) = state["intermediates"]["backbone"]["pixels"]
  expected = (images - np.array([100.0, 110.0, 120.0])) / np.array([50.0, 60.0, 70.0])
  np.testing.assert_allclose(pixels, expected, rtol=1e-6)


def test_trains_with_the_backbones_frozen_parameters(toy_config):
  step, state, data = bench_train_step.prepare(toy_config, 2, 64, 96)
  before = jax.tree.map(np.asarray, state.params["backbone"])
  for _ in range(2):
    state, metrics = step(state, data)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["finite"]) == 1.0
  after = jax.tree.map(np.asarray, state.params["backbone"])
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(after["fine"][name], before["fine"][name])
    assert not np.array_equal(after["coarse"][name], before["coarse"][name]), name


@pytest.mark.parametrize("name", sorted(bench_backbones.BACKBONES))
def test_bench_backbones_times_each_backbone_in_the_custom_recipe(name):
  """The benchmark's detectors: the recipe's head and sizes, the named backbone, no weights file
  (speed does not depend on the weights)."""
  config = bench_backbones.config_of(name)
  recipe = custom.get_config("scratch" if name == "resnet18_scratch" else "")
  assert config.model.backbone.weights == ""
  expected = {"resnet18_scratch": "resnet", "mobilenet_v2": "mobilenet_v2"}.get(
      name, "efficientnet_lite")
  assert config.model.backbone.name == expected
  if expected == "efficientnet_lite":
    assert config.model.backbone.variant == int(name[-1])
  for field in ("num_proposals", "num_stages", "hidden_dim"):
    assert config.model[field] == recipe.model[field]
  assert config.data.to_dict() == recipe.data.to_dict()
  assert config.model.backbone.freeze_at == recipe.model.backbone.freeze_at
  detector.build_model(config.model)  # every backbone builds from its config
