"""Convolution with matrix-product gradients: values and gradients against a NumPy loop and
against XLA's own differentiation of the same convolution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_rcnn_jax import conv


def numpy_conv(x, w, stride):
  """Direct loop: y[b, i, j, o] = sum over taps of xpad[b, s*i + di, s*j + dj, :] @ w[di, dj]."""
  k = w.shape[0]
  pad = (k - 1) // 2
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  oh = (x.shape[1] + 2 * pad - k) // stride + 1
  ow = (x.shape[2] + 2 * pad - k) // stride + 1
  y = np.zeros((x.shape[0], oh, ow, w.shape[-1]))
  for di in range(k):
    for dj in range(k):
      patch = xp[:, di:di + stride * (oh - 1) + 1:stride, dj:dj + stride * (ow - 1) + 1:stride]
      y += patch @ w[di, dj]
  return y


def numpy_grads(x, w, stride, cotangent):
  """(dL/dx, dL/dw) of sum(conv(x, w) * cotangent), by the same loop run backwards."""
  k = w.shape[0]
  pad = (k - 1) // 2
  oh, ow = cotangent.shape[1:3]
  dxp = np.zeros((x.shape[0], x.shape[1] + 2 * pad, x.shape[2] + 2 * pad, x.shape[3]))
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dw = np.zeros_like(w, np.float64)
  for di in range(k):
    for dj in range(k):
      rows = slice(di, di + stride * (oh - 1) + 1, stride)
      cols = slice(dj, dj + stride * (ow - 1) + 1, stride)
      dw[di, dj] = np.einsum("bhwi,bhwo->io", xp[:, rows, cols], cotangent)
      dxp[:, rows, cols] += cotangent @ w[di, dj].T
  return dxp[:, pad:pad + x.shape[1], pad:pad + x.shape[2]], dw


CASES = [  # batch, height, width, in, out, kernel, stride
    (2, 9, 11, 16, 8, 1, 1),
    (2, 9, 11, 16, 8, 1, 2),
    (1, 10, 7, 16, 5, 3, 1),
    (2, 13, 10, 16, 6, 3, 2),
    (1, 12, 12, 16, 4, 3, 2),
    (1, 17, 15, 3, 4, 7, 2),    # a stem: few input channels
    (1, 1, 1, 16, 3, 3, 2),     # a 1x1 map
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", ["matmul_grad", "xla"])
def test_value_and_gradients_match_numpy_loop(case, impl):
  b, h, w_, ci, co, k, s = case
  rng = np.random.default_rng(hash(case) % 2**32)
  x = rng.standard_normal((b, h, w_, ci)).astype(np.float32)
  w = rng.standard_normal((k, k, ci, co)).astype(np.float32)
  fn = conv.make_conv(impl)
  y = np.asarray(jax.jit(fn, static_argnums=2)(x, w, s))
  expected = numpy_conv(x.astype(np.float64), w.astype(np.float64), s)
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)

  cotangent = rng.standard_normal(y.shape).astype(np.float32)
  dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w, s) * cotangent), (0, 1)))(x, w)
  want_dx, want_dw = numpy_grads(x.astype(np.float64), w.astype(np.float64), s, cotangent)
  np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=1e-4, atol=1e-4)


def test_matmul_gradients_equal_xla_gradients_on_a_resnet_block():
  """A bottleneck with a strided 3x3 conv and a strided 1x1 shortcut, differentiated both
  ways: the same gradients to float32 rounding."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 32, 24, 32)), jnp.float32)
  kernels = [jnp.asarray(rng.standard_normal(shape) * 0.1, jnp.float32)
             for shape in [(1, 1, 32, 16), (3, 3, 16, 16), (1, 1, 16, 64), (1, 1, 32, 64)]]

  def block(conv_fn, x, ks):
    y = jax.nn.relu(conv_fn(x, ks[0], 1))
    y = jax.nn.relu(conv_fn(y, ks[1], 2))
    y = conv_fn(y, ks[2], 1)
    return jnp.sum(jnp.sin(jax.nn.relu(y + conv_fn(x, ks[3], 2))))

  grads = {impl: jax.jit(jax.grad(lambda x, ks, impl=impl: block(conv.make_conv(impl), x, ks),
                                  (0, 1)))(x, kernels) for impl in ("matmul_grad", "xla")}
  for a, b in zip(jax.tree.leaves(grads["matmul_grad"]), jax.tree.leaves(grads["xla"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4,
                               atol=2e-5 * float(jnp.abs(b).max()))


def _conv_windows(impl: str) -> list[str]:
  """The window sizes of the convolutions in the compiled gradient of a 1x1 and a strided
  3x3 convolution."""
  x = jnp.ones((1, 32, 32, 16))
  k1, k3 = jnp.ones((1, 1, 16, 16)), jnp.ones((3, 3, 16, 16))
  fn = conv.make_conv(impl)
  loss = lambda x, k1, k3: jnp.sum(jnp.sin(fn(jax.nn.relu(fn(x, k1, 1)), k3, 2)))
  hlo = jax.jit(jax.grad(loss, (1, 2))).lower(x, k1, k3).compile().as_text()
  return [line.split("window={size=")[1].split()[0].rstrip(",}")
          for line in hlo.splitlines() if " convolution(" in line and "window={size=" in line]


def test_matmul_form_compiles_no_weight_gradient_convolution():
  """XLA's weight gradients are convolutions with the output map as window; in the matmul
  form they are dots, and the only convolution left is the 3x3 forward."""
  assert any(w not in ("1x1", "3x3") for w in _conv_windows("xla"))
  assert set(_conv_windows("matmul_grad")) == {"3x3"}


def test_conv_module_names_and_bias():
  module = conv.Conv(5, 3, impl="matmul_grad")
  x = jnp.ones((1, 6, 6, 2))
  params = module.init(jax.random.PRNGKey(0), x)["params"]
  assert params["kernel"].shape == (3, 3, 2, 5) and params["bias"].shape == (5,)
  params = {"kernel": params["kernel"], "bias": jnp.arange(5.0)}
  y = module.apply({"params": params}, x)
  expected = numpy_conv(np.ones((1, 6, 6, 2)), np.asarray(params["kernel"], np.float64), 1)
  np.testing.assert_allclose(np.asarray(y), expected + np.arange(5.0), rtol=1e-5, atol=1e-5)


def test_impl_is_checked_and_auto_follows_the_platform():
  with pytest.raises(ValueError, match="conv impl"):
    conv.make_conv("cudnn")
  auto = conv.make_conv("auto")
  expected = conv.make_conv("matmul_grad" if jax.default_backend() == "cpu" else "xla")
  assert auto is expected
