"""Convolutions (ordinary and depthwise, implicit and explicit padding) in every impl: values and
gradients against a NumPy loop, and against XLA's own differentiation of the same convolution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_rcnn_jax.model import conv


def _numpy_pads(k, padding):
  pad = (k - 1) // 2
  return ((pad, pad), (pad, pad)) if padding is None else padding


def _numpy_taps(x, w, stride, padding):
  """The padded input, and per tap (di, dj) the slices of it that the output pixels read."""
  k = w.shape[0]
  (top, bottom), (left, right) = _numpy_pads(k, padding)
  xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  oh = (xp.shape[1] - k) // stride + 1
  ow = (xp.shape[2] - k) // stride + 1
  taps = {(di, dj): (slice(di, di + stride * (oh - 1) + 1, stride),
                     slice(dj, dj + stride * (ow - 1) + 1, stride))
          for di in range(k) for dj in range(k)}
  return xp, taps


def numpy_conv(x, w, stride, padding=None):
  """Direct loop: y[b, i, j, o] = sum over taps of xpad[b, s*i + di, s*j + dj, :] @ w[di, dj];
  a depthwise kernel [k, k, 1, C] multiplies channel by channel instead. padding ((top,
  bottom), (left, right)), None: (k - 1) // 2 on every side."""
  xp, taps = _numpy_taps(x, w, stride, padding)
  depthwise = w.shape[2] == 1 and w.shape[3] == x.shape[3]
  y = 0
  for (di, dj), (rows, cols) in taps.items():
    patch = xp[:, rows, cols]
    y = y + (patch * w[di, dj, 0] if depthwise else patch @ w[di, dj])
  return y


def numpy_grads(x, w, stride, cotangent, padding=None):
  """(dL/dx, dL/dw) of sum(numpy_conv(x, w) * cotangent), by the same loop run backwards."""
  xp, taps = _numpy_taps(x, w, stride, padding)
  (top, _), (left, _) = _numpy_pads(w.shape[0], padding)
  depthwise = w.shape[2] == 1 and w.shape[3] == x.shape[3]
  dxp = np.zeros(xp.shape)
  dw = np.zeros(w.shape)
  for (di, dj), (rows, cols) in taps.items():
    patch = xp[:, rows, cols]
    if depthwise:
      dw[di, dj, 0] = np.einsum("bhwc,bhwc->c", patch, cotangent)
      dxp[:, rows, cols] += cotangent * w[di, dj, 0]
    else:
      dw[di, dj] = np.einsum("bhwi,bhwo->io", patch, cotangent)
      dxp[:, rows, cols] += cotangent @ w[di, dj].T
  return dxp[:, top:top + x.shape[1], left:left + x.shape[2]], dw


def check_against_numpy(fn, x, w, stride, padding, rtol=1e-4, atol=1e-4):
  """fn(x, w, stride, padding)'s value and jax.vjp cotangents against the NumPy loop (float64)."""
  rng = np.random.default_rng(x.size)
  y, vjp = jax.jit(lambda x, w: jax.vjp(lambda x, w: fn(x, w, stride, padding), x, w))(x, w)
  expected = numpy_conv(x.astype(np.float64), w.astype(np.float64), stride, padding)
  np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=rtol, atol=atol)
  cotangent = rng.standard_normal(y.shape).astype(np.float32)
  dx, dw = jax.jit(vjp)(jnp.asarray(cotangent, y.dtype))
  want_dx, want_dw = numpy_grads(x.astype(np.float64), w.astype(np.float64), stride,
                                 cotangent.astype(np.float64), padding)
  np.testing.assert_allclose(np.asarray(dx, np.float64), want_dx, rtol=rtol, atol=atol)
  np.testing.assert_allclose(np.asarray(dw, np.float64), want_dw, rtol=rtol, atol=atol)


CASES = [  # batch, height, width, in, out, kernel, stride, padding (None: (k - 1) // 2)
    (2, 9, 11, 16, 8, 1, 1, None),
    (2, 9, 11, 16, 8, 1, 2, None),
    (1, 10, 7, 16, 5, 3, 1, None),
    (2, 13, 10, 16, 6, 3, 2, None),
    (1, 12, 12, 16, 4, 3, 2, None),
    (1, 17, 15, 3, 4, 7, 2, None),               # a stem: few input channels
    (1, 1, 1, 16, 3, 3, 2, None),                # a 1x1 map
    (1, 12, 10, 16, 5, 3, 2, ((0, 1), (0, 1))),  # TF "SAME", stride 2: asymmetric
    (1, 11, 12, 16, 4, 5, 2, ((2, 1), (1, 2))),
    (1, 9, 8, 16, 4, 3, 1, ((2, 0), (0, 1))),    # stride 1: XLA's gradients
    (1, 12, 11, 3, 4, 3, 2, ((0, 1), (1, 1))),   # an EfficientNet-Lite stem: XLA's gradients
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", ["matmul_grad", "xla"])
def test_value_and_gradients_match_numpy_loop(case, impl):
  b, h, w_, ci, co, k, s, padding = case
  rng = np.random.default_rng(hash(case[:7]) % 2**32)
  x = rng.standard_normal((b, h, w_, ci)).astype(np.float32)
  w = rng.standard_normal((k, k, ci, co)).astype(np.float32)
  check_against_numpy(conv.make_conv(impl), x, w, s, padding)


DEPTHWISE_CASES = [  # batch, height, width, channels, kernel, stride, padding
    (2, 9, 11, 5, 3, 1, None),                    # MobileNetV2: (k - 1) // 2 on every side
    (1, 9, 7, 4, 3, 2, None),
    (2, 10, 8, 6, 3, 2, "same"),                  # TF "SAME", even sizes: (0, 1)
    (1, 12, 10, 3, 5, 2, "same"),                 # (1, 2)
    (1, 9, 11, 4, 5, 2, "same"),                  # odd sizes: symmetric
    (1, 11, 10, 3, 5, 1, "same"),
    (1, 9, 8, 3, 5, 2, ((2, 1), (0, 3))),
    (2, 7, 10, 4, 3, 2, ((1, 0), (0, 1))),
    (1, 8, 9, 3, 3, 1, ((0, 2), (2, 0))),
    (1, 1, 1, 3, 3, 2, None),                     # a 1x1 map
    (1, 6, 6, 3, 1, 2, None),                     # a kernel smaller than the stride
]


def _depthwise_inputs(case, dtype=np.float32):
  b, h, w_, c, k, s, padding = case
  if padding == "same":
    padding = conv.same_padding((h, w_), k, s)
  rng = np.random.default_rng(hash(case[:6]) % 2**32)
  x = rng.standard_normal((b, h, w_, c)).astype(dtype)
  w = rng.standard_normal((k, k, 1, c)).astype(dtype)
  return x, w, s, padding


@pytest.mark.parametrize("case", DEPTHWISE_CASES)
@pytest.mark.parametrize("impl", ["matmul_grad", "xla"])
def test_depthwise_value_and_gradients_match_numpy_loop(case, impl):
  check_against_numpy(conv.make_depthwise_conv(impl), *_depthwise_inputs(case))


@pytest.mark.parametrize("impl", ["matmul_grad", "xla"])
def test_depthwise_bfloat16_is_close_to_float32(impl):
  x, w, s, padding = _depthwise_inputs((2, 12, 10, 8, 5, 2, "same"))
  fn = conv.make_depthwise_conv(impl)
  y = jax.jit(fn, static_argnums=(2, 3))(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), s,
                                         padding)
  assert y.dtype == jnp.bfloat16
  # Inputs rounded to bfloat16 (2**-9 relative) over 25 taps of unit-variance products.
  np.testing.assert_allclose(np.asarray(y, np.float64),
                             numpy_conv(x.astype(np.float64), w.astype(np.float64), s, padding),
                             rtol=0, atol=0.1)


def test_depthwise_bfloat16_gradients_are_close_to_float32():
  x, w, s, padding = _depthwise_inputs((2, 12, 10, 8, 3, 2, "same"))
  cotangent = np.random.default_rng(1).standard_normal((2, 6, 5, 8)).astype(np.float32)
  fn = conv.make_depthwise_conv("matmul_grad")
  loss = lambda x, w: jnp.sum(fn(x, w, s, padding).astype(jnp.float32) * cotangent)
  dx, dw = jax.jit(jax.grad(loss, (0, 1)))(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  assert dx.dtype == dw.dtype == jnp.bfloat16
  want_dx, want_dw = numpy_grads(x.astype(np.float64), w.astype(np.float64), s,
                                 cotangent.astype(np.float64), padding)
  np.testing.assert_allclose(np.asarray(dx, np.float64), want_dx, rtol=0, atol=0.05)
  np.testing.assert_allclose(np.asarray(dw, np.float64), want_dw, rtol=2e-2, atol=0.2)


def test_same_padding_is_tensorflows():
  assert conv.same_padding((384, 384), 3, 2) == ((0, 1), (0, 1))
  assert conv.same_padding((96, 95), 5, 2) == ((1, 2), (2, 2))
  assert conv.same_padding((24, 24), 5, 1) == ((2, 2), (2, 2))
  assert conv.same_padding((1, 2), 3, 2) == ((1, 1), (0, 1))
  for n, k, s in [(384, 3, 2), (95, 5, 2), (7, 3, 1), (1, 5, 2)]:
    padding = conv.same_padding((n, n), k, s)
    assert conv.output_hw((n, n), k, s, padding) == (-(-n // s),) * 2


def test_depthwise_taps_compile_no_convolution():
  """The CPU form is elementwise multiply-adds and sums: its gradient has no convolution."""
  x, w = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 1, 8))
  fn = conv.make_depthwise_conv("matmul_grad")
  loss = lambda x, w: jnp.sum(jnp.sin(fn(x, w, 2, ((0, 1), (0, 1)))))
  hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).compile().as_text()
  assert " convolution(" not in hlo


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


@pytest.mark.parametrize("make", [conv.make_conv, conv.make_depthwise_conv])
def test_impl_is_checked_and_auto_follows_the_platform(make):
  with pytest.raises(ValueError, match="conv impl"):
    make("cudnn")
  assert make("auto") is make("matmul_grad" if jax.default_backend() == "cpu" else "xla")
