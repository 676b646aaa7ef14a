"""The inverted-residual backbones' shared rules: parts by level, freeze_at, group norm from
scratch, bfloat16, and the two convolution forms, on a small network of the same blocks (the
real networks' layers are checked against PyTorch in test_efficientnet_lite.py and
test_mobilenet_v2.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_rcnn_jax.model.backbones import inverted_residual
from sparse_rcnn_jax.model.backbones.inverted_residual import PARTS, BlockSpec, NetSpec


class TinyNet(inverted_residual.InvertedResidualNet):
  """Six blocks over every part: kernels 3 and 5, strides 1 and 2, expansion 1 and 3, a
  residual, and `padding` "same" (EfficientNet-Lite's) or "symmetric" (MobileNetV2's)."""
  padding: str = "same"

  @property
  def spec(self) -> NetSpec:
    blocks = [BlockSpec(8, 8, 1, 3, 1), BlockSpec(8, 8, 3, 3, 2), BlockSpec(8, 16, 3, 5, 2),
              BlockSpec(16, 16, 3, 3, 1), BlockSpec(16, 16, 3, 5, 2), BlockSpec(16, 24, 3, 3, 2)]
    return NetSpec(8, inverted_residual.group_by_part(blocks), 32, self.padding, 1e-3)


NETS = {"same": lambda **kw: TinyNet(padding="same", **kw),
        "symmetric": lambda **kw: TinyNet(padding="symmetric", **kw)}


def test_parts_follow_the_output_stride():
  blocks = [BlockSpec(8, 8, 1, 3, 1), BlockSpec(8, 8, 6, 3, 2), BlockSpec(8, 8, 6, 3, 1),
            BlockSpec(8, 8, 6, 3, 2), BlockSpec(8, 8, 6, 3, 2), BlockSpec(8, 8, 6, 3, 1),
            BlockSpec(8, 8, 6, 3, 2)]
  parts = inverted_residual.group_by_part(blocks)
  assert [len(parts[p]) for p in PARTS] == [1, 2, 1, 2, 1]


def _random_variables(net, x, seed=0) -> dict:
  """Random parameters and batch-norm values of `net` for input `x` (not its initialization:
  compiling flax's initializers costs more than these tests' programs)."""
  shapes = jax.eval_shape(net.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def normal(s):
    return (rng.standard_normal(s.shape) / np.sqrt(max(np.prod(s.shape[:-1]), 1))).astype(s.dtype)

  variables = {"params": jax.tree.map(normal, shapes["params"])}
  if "batch_stats" in shapes:
    variables["batch_stats"] = jax.tree.map(
        lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), shapes["batch_stats"])
  return variables


@pytest.mark.parametrize("freeze_at", [0, 2, 5])
def test_freeze_at_stops_gradients_of_the_first_parts(freeze_at):
  net = TinyNet(freeze_at=freeze_at)
  x = np.random.default_rng(0).standard_normal((1, 64, 96, 3)).astype(np.float32)
  variables = _random_variables(net, x)

  def loss(params):
    features = net.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
    return sum(jnp.mean(f**2) for f in features.values())

  grads = jax.jit(jax.grad(loss))(variables["params"])
  frozen = PARTS[:freeze_at]
  for part, tree in grads.items():
    for path, grad in jax.tree_util.tree_leaves_with_path(tree):
      where = part + jax.tree_util.keystr(path)
      assert net.is_frozen((part, *(k.key for k in path))) == (part in frozen), where
      assert np.any(grad) != (part in frozen), where


def test_group_norm_from_scratch_is_trainable():
  net = TinyNet(norm="group_norm", freeze_at=0)
  x = np.random.default_rng(0).standard_normal((1, 64, 96, 3)).astype(np.float32)
  variables = _random_variables(net, x)
  assert set(variables) == {"params"}

  def loss(params):
    return sum(jnp.mean(f**2) for f in net.apply({"params": params}, x).values())

  grads = jax.jit(jax.grad(loss))(variables["params"])
  for path, grad in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(grad)) and np.any(grad), jax.tree_util.keystr(path)
  with pytest.raises(ValueError, match="frozen_bn"):
    inverted_residual.InvertedResidualNet.pretrained(net, "imagenet")


@pytest.mark.parametrize("name", sorted(NETS))
def test_bfloat16_agrees_with_float32(name):
  x = np.random.default_rng(0).standard_normal((2, 96, 64, 3)).astype(np.float32)
  variables = _random_variables(NETS[name](), x)
  f32 = jax.jit(NETS[name]().apply)(variables, x)
  bf16 = jax.jit(NETS[name](dtype="bfloat16").apply)(variables, x)
  for level in f32:
    assert bf16[level].dtype == jnp.bfloat16
    a, b = np.asarray(bf16[level], np.float32), np.asarray(f32[level])
    # bfloat16 keeps 8 significant bits; a few layers of rounding stay within a few percent.
    assert np.sqrt(np.mean((a - b)**2) / np.mean(b**2)) < 0.05, level


@pytest.mark.parametrize("name", sorted(NETS))
def test_convolution_forms_compute_the_same_function_and_gradients(name):
  x = np.random.default_rng(0).standard_normal((2, 64, 96, 3)).astype(np.float32)
  variables = _random_variables(NETS[name](), x)
  results = {}
  for impl in ("matmul_grad", "xla"):
    net = NETS[name](conv_impl=impl, freeze_at=0)

    def loss(params, net=net):
      features = net.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
      return sum(jnp.mean(jnp.sin(f)) for f in features.values())

    results[impl] = jax.jit(jax.value_and_grad(loss))(variables["params"])
  (value_a, grads_a), (value_b, grads_b) = results["matmul_grad"], results["xla"]
  np.testing.assert_allclose(value_a, value_b, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max() + 1e-12)
