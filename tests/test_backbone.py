"""ResNet against a NumPy re-implementation of torchvision's forward pass.

The reference below reads torchvision-named weights in PyTorch layout directly; our network gets
the same weights through the converter. Agreement on odd-sized inputs shows that real ImageNet
weights would give the network they were trained for, paddings and output sizes included. The
reference helpers are imported by test_fpn.py and test_convert_backbone.py.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_rcnn_jax.model.backbones import resnet
from sparse_rcnn_jax.model.backbones.resnet import ConvNorm, ConvSpec, ResNet, resnet_from_torchvision

TORCHVISION_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def torchvision_resnet_state(depth: int, width: int, rng: np.random.Generator) -> dict:
  """A random state dict with the names, layouts and block rules of torchvision's ResNet
  (`_make_layer`: downsample when stride != 1 or inplanes != planes * expansion), plus fc."""
  state = {}

  def conv(name, out_channels, in_channels, k):
    std = math.sqrt(2.0 / (in_channels * k * k))
    state[name] = (rng.standard_normal((out_channels, in_channels, k, k)) * std).astype(np.float32)

  def bn(prefix, channels):
    state[f"{prefix}.weight"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    state[f"{prefix}.bias"] = rng.normal(0.0, 0.2, channels).astype(np.float32)
    state[f"{prefix}.running_mean"] = rng.normal(0.0, 0.2, channels).astype(np.float32)
    state[f"{prefix}.running_var"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    state[f"{prefix}.num_batches_tracked"] = np.array(0, np.int64)

  bottleneck = depth >= 50
  expansion = 4 if bottleneck else 1
  conv("conv1.weight", width, 3, 7)
  bn("bn1", width)
  inplanes = width
  for n, num_blocks in enumerate(TORCHVISION_LAYERS[depth], start=1):
    planes = width * 2**(n - 1)
    for j in range(num_blocks):
      stride = 2 if n > 1 and j == 0 else 1
      p = f"layer{n}.{j}."
      if bottleneck:
        kernels = ((planes, inplanes, 1), (planes, planes, 3), (planes * 4, planes, 1))
      else:
        kernels = ((planes, inplanes, 3), (planes, planes, 3))
      for k, (out_channels, in_channels, size) in enumerate(kernels, start=1):
        conv(f"{p}conv{k}.weight", out_channels, in_channels, size)
        bn(f"{p}bn{k}", out_channels)
      if j == 0 and (stride != 1 or inplanes != planes * expansion):
        conv(f"{p}downsample.0.weight", planes * expansion, inplanes, 1)
        bn(f"{p}downsample.1", planes * expansion)
      inplanes = planes * expansion
  state["fc.weight"] = rng.standard_normal((10, inplanes)).astype(np.float32)
  state["fc.bias"] = np.zeros(10, np.float32)
  return state


def conv2d(x, weight, bias=None, stride=1, padding=0):
  """torch.nn.functional.conv2d in float64, NHWC: x [B, H, W, I], weight [O, I, kH, kW]."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  _, height, width, _ = x.shape
  _, _, kh, kw = weight.shape
  out_h, out_w = (height - kh) // stride + 1, (width - kw) // stride + 1
  out = 0.0
  for i in range(kh):
    for j in range(kw):
      window = x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
      out = out + window @ weight[:, :, i, j].T.astype(np.float64)
  return out if bias is None else out + bias


def max_pool_3x3_s2_p1(x):
  """torch's max_pool2d(kernel 3, stride 2, padding 1): padding never wins."""
  x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  out_h, out_w = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
  return np.max([x[:, i:i + 2 * out_h - 1:2, j:j + 2 * out_w - 1:2]
                 for i in range(3) for j in range(3)], axis=0)


def batch_norm_eval(x, state, prefix):
  """torch BatchNorm2d in eval mode."""
  return ((x - state[f"{prefix}.running_mean"]) / np.sqrt(state[f"{prefix}.running_var"] + 1e-5)
          * state[f"{prefix}.weight"] + state[f"{prefix}.bias"])


def torchvision_resnet_forward(state, depth, x):
  """torchvision ResNet.forward up to layer4, collecting the outputs of layer1..4 (res2..res5)
  by pyramid level 2..5."""
  relu = lambda v: np.maximum(v, 0.0)
  x = relu(batch_norm_eval(conv2d(x, state["conv1.weight"], stride=2, padding=3), state, "bn1"))
  x = max_pool_3x3_s2_p1(x)
  features = {}
  for n, num_blocks in enumerate(TORCHVISION_LAYERS[depth], start=1):
    for j in range(num_blocks):
      p = f"layer{n}.{j}."
      stride = 2 if n > 1 and j == 0 else 1
      if depth >= 50:
        out = relu(batch_norm_eval(conv2d(x, state[p + "conv1.weight"]), state, p + "bn1"))
        out = relu(batch_norm_eval(conv2d(out, state[p + "conv2.weight"], stride=stride,
                                          padding=1), state, p + "bn2"))
        out = batch_norm_eval(conv2d(out, state[p + "conv3.weight"]), state, p + "bn3")
      else:
        out = relu(batch_norm_eval(conv2d(x, state[p + "conv1.weight"], stride=stride,
                                          padding=1), state, p + "bn1"))
        out = batch_norm_eval(conv2d(out, state[p + "conv2.weight"], padding=1), state, p + "bn2")
      identity = x
      if p + "downsample.0.weight" in state:
        identity = batch_norm_eval(conv2d(x, state[p + "downsample.0.weight"], stride=stride),
                                   state, p + "downsample.1")
      x = relu(out + identity)
    features[n + 1] = x
  return features


def assert_close(actual, expected, rtol=1e-4):
  """Elementwise relative tolerance, floored at rtol * max|expected| for values near 0."""
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol,
                             atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize("depth, width, shape", [(18, 16, (1, 67, 45, 3)),
                                                 (50, 8, (2, 35, 50, 3))])
def test_matches_torchvision_reference(depth, width, shape):
  rng = np.random.default_rng(depth)
  state = torchvision_resnet_state(depth, width, rng)
  params, batch_stats = resnet_from_torchvision(state, depth)
  x = rng.standard_normal(shape).astype(np.float32)
  ours = ResNet(depth, width).apply({"params": params, "batch_stats": batch_stats}, x)
  expected = torchvision_resnet_forward(state, depth, x)
  assert list(ours) == [2, 3, 4, 5] == list(ResNet(depth).levels)
  for level in expected:
    assert ours[level].shape == expected[level].shape, level
    assert_close(ours[level], expected[level])


def _torch_out(size, kernel, stride, padding):
  return (size + 2 * padding - kernel) // stride + 1


@pytest.mark.parametrize("depth, height, width", [(18, 31, 45), (50, 33, 97), (50, 224, 224),
                                                  (101, 800, 1333)])
def test_output_shapes_follow_pytorch(depth, height, width):
  model = ResNet(depth)
  x = jax.ShapeDtypeStruct((2, height, width, 3), jnp.float32)
  features, _ = jax.eval_shape(model.init_with_output, jax.random.key(0), x)
  size = np.array([height, width])
  size = _torch_out(_torch_out(size, 7, 2, 3), 3, 2, 1)
  expansion = 4 if depth >= 50 else 1
  for number, level in enumerate([2, 3, 4, 5]):
    if number > 0:
      size = _torch_out(size, 3, 2, 1)
    channels = 64 * 2**number * expansion
    assert features[level].shape == (2, *size, channels), level
  if (height, width) == (224, 224):
    assert features[5].shape == (2, 7, 7, 2048)


def _trainable_count(depth):
  """Conv weights + batch-norm weight and bias: torchvision's trainable values without fc."""
  variables = jax.eval_shape(ResNet(depth).init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  stats = jax.tree_util.tree_leaves_with_path(variables["batch_stats"])
  return (sum(leaf.size for leaf in jax.tree.leaves(variables["params"])) +
          sum(leaf.size for path, leaf in stats if path[-1].key in ("weight", "bias")))


def test_parameter_counts_equal_torchvision():
  assert _trainable_count(50) == 23_508_032
  assert _trainable_count(101) == 42_500_160


def _random_like(tree, rng):
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), tree)


@pytest.mark.parametrize("freeze_at", [0, 1, 2])
def test_freeze_at_stops_gradients(freeze_at):
  rng = np.random.default_rng(freeze_at)
  params, batch_stats = resnet_from_torchvision(torchvision_resnet_state(18, 8, rng), 18)
  model = ResNet(18, width=8, freeze_at=freeze_at)
  x = rng.standard_normal((1, 32, 32, 3)).astype(np.float32)

  def loss(p):
    features = model.apply({"params": p, "batch_stats": batch_stats}, x)
    return sum(jnp.mean(f**2) for f in features.values())

  grads = jax.jit(jax.grad(loss))(params)
  frozen = ["stem", "res2", "res3", "res4", "res5"][:freeze_at]
  for part, tree in grads.items():
    for path, grad in jax.tree_util.tree_leaves_with_path(tree):
      where = part + jax.tree_util.keystr(path)
      # The optimizer's mask (is_frozen) names exactly the parameters without gradient.
      assert model.is_frozen((part, *(k.key for k in path))) == (part in frozen), where
      if part in frozen:
        assert not np.any(grad), where
      else:
        assert np.any(grad), where


def test_invalid_settings_are_rejected():
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="depth"):
    jax.eval_shape(ResNet(152).init, key, x)
  with pytest.raises(ValueError, match="norm"):
    jax.eval_shape(ResNet(18, norm="batch_norm").init, key, x)
  with pytest.raises(ValueError, match="freeze_at"):
    jax.eval_shape(ResNet(18, freeze_at=6).init, key, x)


def group_norm(x, scale, bias, groups, eps=1e-5):
  """torch GroupNorm on NHWC: statistics over (H, W, channels of the group)."""
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  g = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True)
                                                           + eps)
  return g.reshape(b, h, w, c) * scale + bias


@pytest.mark.parametrize("channels, groups", [(64, 32), (16, 16)])
def test_group_norm_conv_matches_reference(channels, groups):
  rng = np.random.default_rng(channels)
  weight = rng.standard_normal((channels, 4, 3, 3)).astype(np.float32)
  scale, bias = rng.uniform(0.5, 1.5, (2, channels)).astype(np.float32)
  x = rng.standard_normal((2, 9, 7, 4)).astype(np.float32)
  params = {"kernel": weight.transpose(2, 3, 1, 0), "norm": {"scale": scale, "bias": bias}}
  ours = ConvNorm(ConvSpec("conv", 4, channels, 3, 2), "group_norm").apply({"params": params}, x)
  expected = group_norm(conv2d(x, weight, stride=2, padding=1), scale, bias, groups)
  assert_close(ours, expected)


def test_group_norm_network_is_trainable():
  rng = np.random.default_rng(0)
  model = ResNet(18, width=16, norm="group_norm", freeze_at=0)
  x = rng.standard_normal((1, 32, 32, 3)).astype(np.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  assert set(shapes) == {"params"}
  assert set(shapes["params"]["res3"]["block0"]["conv1"]["norm"]) == {"scale", "bias"}
  params = _random_like(shapes["params"], rng)

  def loss(p):
    return sum(jnp.mean(f**2) for f in model.apply({"params": p}, x).values())

  grads = jax.jit(jax.grad(loss))(params)
  for path, grad in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(grad)) and np.any(grad), jax.tree_util.keystr(path)


def test_init_kaiming_normal_fan_out_and_identity_frozen_bn():
  spec = ConvSpec("conv1", 3, 64, 7, 2)
  variables = jax.jit(ConvNorm(spec, "frozen_bn").init)(jax.random.key(0),
                                                        jnp.zeros((1, 16, 16, 3)))
  kernel = np.asarray(variables["params"]["kernel"])
  assert kernel.shape == (7, 7, 3, 64)
  std = math.sqrt(2.0 / (7 * 7 * 64))  # fan_out = kH * kW * out_channels, gain sqrt(2)
  assert abs(kernel.std() / std - 1) < 0.05
  assert np.abs(kernel).max() > 3 * std  # a plain normal, not a truncated one
  stats = variables["batch_stats"]["norm"]
  for name, value in [("weight", 1), ("bias", 0), ("running_mean", 0), ("running_var", 1)]:
    np.testing.assert_array_equal(stats[name], np.full(64, value, np.float32), err_msg=name)


def _max_pool_loop(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """torch's MaxPool2d(3, stride 2, padding 1) as a NumPy loop: the output, and for each
  output the flat input index of its first maximum (row-major in the window), which receives
  the whole gradient."""
  b, h, w, c = x.shape
  ho, wo = (h + 1) // 2, (w + 1) // 2
  out = np.zeros((b, ho, wo, c), x.dtype)
  argmax = np.zeros((b, ho, wo, c), np.int64)
  for n, i, j, k in np.ndindex(b, ho, wo, c):
    best, where = -np.inf, -1
    for di in range(3):
      for dj in range(3):
        r, s = 2 * i - 1 + di, 2 * j - 1 + dj
        if 0 <= r < h and 0 <= s < w and x[n, r, s, k] > best:
          best, where = x[n, r, s, k], np.ravel_multi_index((n, r, s, k), x.shape)
    out[n, i, j, k], argmax[n, i, j, k] = best, where
  return out, argmax


@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (1, 8, 6, 2)])
def test_stem_max_pool_equals_torch_rule_with_ties(shape):
  """resnet.max_pool_3x3_s2 (two 1-d windows, for ONNX) against a NumPy loop, on integers so
  that many windows hold tied maxima: the same values, and each output's gradient goes to its
  window's first maximum."""
  x = np.random.default_rng(0).integers(-3, 4, shape).astype(np.float32)
  want, argmax = _max_pool_loop(x)
  np.testing.assert_array_equal(resnet.max_pool_3x3_s2(jnp.asarray(x)), want)
  weights = np.random.default_rng(1).normal(size=want.shape).astype(np.float32)
  grad = jax.grad(lambda v: (resnet.max_pool_3x3_s2(v) * weights).sum())(jnp.asarray(x))
  expected = np.zeros(x.size, np.float32)
  np.add.at(expected, argmax.ravel(), weights.ravel())
  np.testing.assert_allclose(np.asarray(grad).ravel(), expected, rtol=1e-6, atol=1e-6)
