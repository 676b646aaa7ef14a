"""Backbone/FPN weight conversion: exact round trips, the model's tree shapes, clear errors.

Numerical correctness of the mapping (which PyTorch weight drives which flax kernel) is proven in
test_backbone.py and test_fpn.py against NumPy references; here the bookkeeping is checked.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_rcnn_jax.model.backbones.resnet import (ResNet, resnet_from_detectron2,
                                             resnet_from_torchvision, resnet_to_detectron2,
                                             torchvision_to_detectron2)
from sparse_rcnn_jax.convert.fpn import fpn_from_detectron2, fpn_to_detectron2
from sparse_rcnn_jax.model.fpn import FPN
from test_backbone import torchvision_resnet_state
from test_fpn import detectron2_fpn_state

_IMAGE = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)


@functools.lru_cache
def _resnet_shapes(depth, width):
  return jax.eval_shape(ResNet(depth, width).init, jax.random.key(0), _IMAGE)


def _assert_trees_equal(actual, expected):
  flat_actual = jax.tree_util.tree_leaves_with_path(actual)
  flat_expected = jax.tree_util.tree_leaves_with_path(expected)
  assert [p for p, _ in flat_actual] == [p for p, _ in flat_expected]
  for (path, a), (_, e) in zip(flat_actual, flat_expected):
    assert a.dtype == e.dtype and np.array_equal(a, e), jax.tree_util.keystr(path)


def _assert_states_equal(actual, expected):
  assert sorted(actual) == sorted(expected)
  for name in expected:
    assert actual[name].dtype == expected[name].dtype, name
    assert np.array_equal(actual[name], expected[name]), name


def _assert_fits(tree, shapes):
  assert jax.tree.structure(tree) == jax.tree.structure(shapes)
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
    assert np.shape(_get(tree, path)) == leaf.shape, jax.tree_util.keystr(path)


def _get(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_round_trip_from_pytorch(depth):
  rng = np.random.default_rng(depth)
  torchvision_state = torchvision_resnet_state(depth, 64, rng)
  state = torchvision_to_detectron2(torchvision_state)
  params, batch_stats = resnet_from_detectron2(state, depth)
  _assert_fits({"params": params, "batch_stats": batch_stats}, _resnet_shapes(depth, 64))
  # Layouts: [O, I, kH, kW] -> [kH, kW, I, O], values untouched.
  torch_weight = state["res3.0.conv2.weight"]
  np.testing.assert_array_equal(params["res3"]["block0"]["conv2"]["kernel"],
                                torch_weight.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(batch_stats["stem"]["conv1"]["norm"]["running_var"],
                                torchvision_state["bn1.running_var"])
  _assert_states_equal(resnet_to_detectron2(params, batch_stats, depth), state)


@pytest.mark.parametrize("depth, width", [(18, 64), (50, 64), (101, 8)])
def test_resnet_round_trip_from_flax(depth, width):
  rng = np.random.default_rng(depth)
  shapes = _resnet_shapes(depth, width)
  variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  state = resnet_to_detectron2(variables["params"], variables["batch_stats"], depth)
  assert state["stem.conv1.weight"].shape == (width, 3, 7, 7)
  params, batch_stats = resnet_from_detectron2(state, depth)
  _assert_trees_equal({"params": params, "batch_stats": batch_stats}, variables)


def test_resnet50_torchvision_state_has_all_320_entries():
  # len(torchvision.models.resnet50().state_dict()) == 320, fc and num_batches_tracked included.
  state = torchvision_resnet_state(50, 64, np.random.default_rng(0))
  assert len(state) == 320
  params, batch_stats = resnet_from_torchvision(state, 50)
  _assert_fits({"params": params, "batch_stats": batch_stats}, _resnet_shapes(50, 64))


def test_torchvision_renaming():
  values = {name: np.full(1, i) for i, name in enumerate([
      "conv1.weight", "bn1.weight", "bn1.running_mean", "bn1.num_batches_tracked",
      "layer1.0.conv3.weight", "layer1.0.bn3.running_var", "layer1.0.downsample.0.weight",
      "layer1.0.downsample.1.bias", "layer4.2.bn2.weight", "layer3.22.conv1.weight",
      "fc.weight", "fc.bias"])}
  renamed = torchvision_to_detectron2(values)
  expected = {
      "conv1.weight": "stem.conv1.weight",
      "bn1.weight": "stem.conv1.norm.weight",
      "bn1.running_mean": "stem.conv1.norm.running_mean",
      "layer1.0.conv3.weight": "res2.0.conv3.weight",
      "layer1.0.bn3.running_var": "res2.0.conv3.norm.running_var",
      "layer1.0.downsample.0.weight": "res2.0.shortcut.weight",
      "layer1.0.downsample.1.bias": "res2.0.shortcut.norm.bias",
      "layer4.2.bn2.weight": "res5.2.conv2.norm.weight",
      "layer3.22.conv1.weight": "res4.22.conv1.weight",
  }
  assert sorted(renamed) == sorted(expected.values())
  for old, new in expected.items():
    assert renamed[new] is values[old]


def test_torchvision_unknown_names_are_listed():
  with pytest.raises(ValueError, match="module.conv1.weight"):
    torchvision_to_detectron2({"module.conv1.weight": np.zeros(1), "conv1.weight": np.zeros(1)})


def _small_state(depth=18):
  state = torchvision_resnet_state(depth, 8, np.random.default_rng(1))
  return torchvision_to_detectron2(state)


def test_resnet_missing_unexpected_and_misshapen_names_are_listed():
  state = _small_state()
  del state["res3.1.conv2.norm.running_var"]
  state["res5.2.conv1.weight"] = np.zeros((64, 64, 3, 3), np.float32)
  state["res4.0.shortcut.weight"] = state["res4.0.shortcut.weight"].transpose(1, 0, 2, 3)
  with pytest.raises(ValueError) as error:
    resnet_from_detectron2(state, 18)
  message = str(error.value)
  assert "1 missing: res3.1.conv2.norm.running_var" in message
  assert "1 unexpected: res5.2.conv1.weight" in message
  assert "1 wrong shape: res4.0.shortcut.weight (16, 32, 1, 1) (expected (32, 16, 1, 1))" in message


def test_resnet_wrong_depth_or_names_are_rejected():
  state = _small_state()
  with pytest.raises(ValueError, match="80 missing: res2.2.conv1.norm.bias"):
    resnet_from_detectron2(state, 34)
  with pytest.raises(ValueError, match="resnet_from_torchvision"):
    resnet_from_detectron2({"conv1.weight": np.zeros((8, 3, 7, 7))}, 18)
  prefixed = {f"backbone.bottom_up.{name}": value for name, value in state.items()}
  with pytest.raises(ValueError, match="stem.conv1.weight"):
    resnet_from_detectron2(prefixed, 18)


def test_resnet_to_detectron2_lists_unknown_and_missing_variables():
  params, batch_stats = resnet_from_detectron2(_small_state(), 18)
  params["res2"]["block0"]["extra"] = {"kernel": np.zeros((1, 1, 8, 8))}
  del batch_stats["res5"]["block1"]["conv2"]["norm"]["bias"]
  with pytest.raises(ValueError) as error:
    resnet_to_detectron2(params, batch_stats, 18)
  assert "missing: res5.1.conv2.norm.bias" in str(error.value)
  assert "unexpected: params/res2/block0/extra/kernel" in str(error.value)


@pytest.mark.parametrize("in_channels", [{2: 256, 3: 512, 4: 1024, 5: 2048}, {3: 8, 4: 16, 5: 24}])
def test_fpn_round_trips(in_channels):
  levels = tuple(in_channels)
  state = detectron2_fpn_state(in_channels, 256, np.random.default_rng(0))
  params = fpn_from_detectron2(state, levels)
  features = {l: jax.ShapeDtypeStruct((1, 2**(7 - l), 2**(7 - l), c), jnp.float32)
              for l, c in in_channels.items()}
  shapes = jax.eval_shape(FPN(256, levels).init, jax.random.key(0), features)["params"]
  _assert_fits(params, shapes)
  np.testing.assert_array_equal(params[f"fpn_output{levels[0]}"]["kernel"],
                                state[f"fpn_output{levels[0]}.weight"].transpose(2, 3, 1, 0))
  back = fpn_to_detectron2(params)
  _assert_states_equal(back, state)
  _assert_trees_equal(fpn_from_detectron2(back, levels), params)


def test_fpn_errors_are_listed():
  state = detectron2_fpn_state({2: 8, 3: 8, 4: 8, 5: 8}, 16, np.random.default_rng(0))
  del state["fpn_lateral3.bias"]
  state["fpn_output2.weight"] = np.zeros((16, 8, 3, 3), np.float32)
  state["fpn_output6.weight"] = np.zeros((16, 16, 3, 3), np.float32)
  with pytest.raises(ValueError) as error:
    fpn_from_detectron2(state)
  message = str(error.value)
  assert "missing: fpn_lateral3.bias" in message
  assert "unexpected: fpn_output6.weight" in message
  assert "wrong shape: fpn_output2.weight (16, 8, 3, 3) (expected (16, 16, 3, 3))" in message
  with pytest.raises(ValueError, match="fpn_lateral"):
    fpn_to_detectron2({"lateral2": {"kernel": np.zeros((1, 1, 8, 8))}})
