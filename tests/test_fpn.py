"""FPN against a NumPy re-implementation of detectron2's FPN.forward (without P6)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_rcnn_jax.convert.fpn import fpn_from_detectron2
from sparse_rcnn_jax.model.fpn import FPN
from test_backbone import assert_close, conv2d


def detectron2_fpn_state(in_channels: dict[int, int], channels: int, rng) -> dict:
  """Random `fpn_lateral{l}` / `fpn_output{l}` weights and biases in PyTorch layout."""
  state = {}
  for level, c_in in in_channels.items():
    for kind, c, k in (("lateral", c_in, 1), ("output", channels, 3)):
      state[f"fpn_{kind}{level}.weight"] = (rng.standard_normal((channels, c, k, k)) /
                                            math.sqrt(c * k * k)).astype(np.float32)
      state[f"fpn_{kind}{level}.bias"] = rng.standard_normal(channels).astype(np.float32)
  return state


def detectron2_fpn_forward(state, features, levels):
  """detectron2 FPN.forward: coarsest first, nearest x2 upsampling, sum, 3x3 output conv."""
  outputs = {}
  previous = None
  for level in reversed(levels):
    lateral = conv2d(features[level], state[f"fpn_lateral{level}.weight"],
                     state[f"fpn_lateral{level}.bias"])
    if previous is not None:
      rows = np.arange(2 * previous.shape[1]) // 2
      cols = np.arange(2 * previous.shape[2]) // 2
      lateral = lateral + previous[:, rows][:, :, cols]
    previous = lateral
    outputs[level] = conv2d(lateral, state[f"fpn_output{level}.weight"],
                            state[f"fpn_output{level}.bias"], padding=1)
  return [outputs[level] for level in levels]


def _features(rng, batch, height, width, in_channels):
  """Backbone-like features {level: map} of an image height x width (multiples of 32)."""
  return {level: rng.standard_normal(
      (batch, height >> level, width >> level, c)).astype(np.float32)
          for level, c in in_channels.items()}


@pytest.mark.parametrize("in_channels", [{2: 16, 3: 32, 4: 64, 5: 128}, {3: 24, 4: 8, 5: 40}])
def test_matches_detectron2_reference(in_channels):
  rng = np.random.default_rng(len(in_channels))
  levels = tuple(in_channels)
  state = detectron2_fpn_state(in_channels, 32, rng)
  features = _features(rng, 2, 128, 96, in_channels)
  ours = FPN(32, levels).apply({"params": fpn_from_detectron2(state, levels)}, features)
  expected = detectron2_fpn_forward(state, features, levels)
  assert len(ours) == len(levels)
  for level, p, e in zip(levels, ours, expected):
    assert p.shape == (2, 128 >> level, 96 >> level, 32)
    assert_close(p, e)


def test_sizes_not_halving_are_rejected():
  rng = np.random.default_rng(0)
  features = _features(rng, 1, 128, 96, {2: 8, 3: 8, 4: 8, 5: 8})
  features[2] = features[2][:, :-1]  # an image height that is not a multiple of 32
  with pytest.raises(ValueError, match="level 2.*multiples of 32"):
    jax.eval_shape(FPN(8).init, jax.random.key(0), features)


def test_missing_backbone_levels_are_named():
  features = _features(np.random.default_rng(0), 1, 64, 64, {3: 8, 4: 8})
  with pytest.raises(ValueError, match=r"levels \(2, 3, 4\).*returned levels \[3, 4\]"):
    jax.eval_shape(FPN(8, (2, 3, 4)).init, jax.random.key(0), features)


def test_init_is_c2_xavier_fill():
  features = {5: jnp.zeros((1, 4, 4, 96))}
  params = jax.jit(FPN(64, in_levels=(5,)).init)(jax.random.key(0), features)["params"]
  for name, fan_in in (("fpn_lateral5", 96), ("fpn_output5", 9 * 64)):
    kernel = np.asarray(params[name]["kernel"])
    bound = math.sqrt(3.0 / fan_in)  # kaiming_uniform(a=1): gain 1
    assert np.abs(kernel).max() <= bound
    assert np.abs(kernel).max() > 0.95 * bound
    assert abs(kernel.std() / (bound / math.sqrt(3)) - 1) < 0.05
    np.testing.assert_array_equal(params[name]["bias"], np.zeros(64, np.float32))
