"""2-D convolution (NHWC x HWIO, PyTorch's padding for odd kernels) with gradients that a CPU
runs fast.

XLA:CPU differentiates a convolution into two more convolutions. The weight gradient is a
convolution whose window is the whole output map, with both operands first copied to
channel-major layout (and XLA fuses the producers of the input, the previous layer's norm,
ReLU and residual sum, into that copy, recomputing them with a cache-hostile access
pattern); the input gradient of a strided convolution dilates the output gradient with zeros
and convolves the result. On a CPU both cost several forwards. `matmul_grad` states them as
matrix products instead, one per kernel tap:

  weight gradient  dW[i, j] = X_ij^T G, with X_ij [B*H'*W', I] the input pixels tap (i, j)
                   reads (a strided slice of the padded input) and G [B*H'*W', O]
  input gradient   dX = sum over taps of G W[i, j]^T, each placed on its pixels by a padding
                   with holes (`lax.pad` with interior padding) for a stride > 1

written as 2-D products, which XLA:CPU runs with a transposed operand in place. This form is
used where it wins: 1x1 and strided convolutions. A stride-1 convolution with a larger kernel
keeps XLA's gradients: its input gradient is itself a stride-1 convolution as fast as the
forward, and its k*k thin weight-gradient products were no faster than XLA's on R-50 and
20 % slower on the small from-scratch models. The values are the same to float32 rounding
(tests/test_conv.py checks them against a NumPy loop). Measured on the R-50 train step at
800x1216 (`benchmarks/compare_official.py`): see the README. On a GPU or TPU the convolution
libraries' own gradients are the better choice: `make_conv("auto")` picks by platform.
"""
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "matmul_grad", "xla")
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
# Inputs with fewer channels (an RGB stem) make per-tap products too thin to pay off.
_MIN_CHANNELS = 16


def conv_xla(x, kernel, stride: int):
  """x [B, H, W, I] * kernel [k, k, I, O] (k odd), padding (k - 1) // 2 on every side ->
  [B, H', W', O] with H' = (H + 2 * pad - k) // stride + 1 as in PyTorch."""
  pad = (kernel.shape[0] - 1) // 2
  return lax.conv_general_dilated(x, kernel, (stride, stride), [(pad, pad), (pad, pad)],
                                  dimension_numbers=_DIMENSIONS)


def _pad_spatial(x, pad: int):
  """Zero padding of the two spatial axes of [B, H, W, C]."""
  if pad == 0:
    return x
  return lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (pad, pad, 0), (pad, pad, 0),
                                                     (0, 0, 0)])


def _tap_inputs(x, kernel_size: int, stride: int, out_hw: tuple[int, int]) -> list:
  """For each tap (i, j), row-major: the input pixels it reads, [B, H', W', I]."""
  pad = (kernel_size - 1) // 2
  padded = _pad_spatial(x, pad)
  oh, ow = out_hw
  limit = lambda i, n: i + stride * (n - 1) + 1
  return [lax.slice(padded, (0, i, j, 0), (x.shape[0], limit(i, oh), limit(j, ow), x.shape[3]),
                    (1, stride, stride, 1))
          for i in range(kernel_size) for j in range(kernel_size)]


def weight_gradient(x, grad, kernel_size: int, stride: int):
  """dL/dW [k, k, I, O] from the input x [B, H, W, I] and the output gradient [B, H', W', O]."""
  grad2d = grad.reshape(-1, grad.shape[-1])
  taps = [tap.reshape(-1, tap.shape[-1]).T @ grad2d
          for tap in _tap_inputs(x, kernel_size, stride, grad.shape[1:3])]
  return jnp.stack(taps).reshape(kernel_size, kernel_size, x.shape[-1], grad.shape[-1])


def input_gradient(grad, kernel, input_hw: tuple[int, int], stride: int):
  """dL/dX [B, H, W, I] from the output gradient [B, H', W', O] and kernel [k, k, I, O]."""
  k = kernel.shape[0]
  pad = (k - 1) // 2
  batch, oh, ow, channels = grad.shape
  height, width = input_hw
  grad2d = grad.reshape(-1, channels)
  total = None
  for i in range(k):
    for j in range(k):
      part = (grad2d @ kernel[i, j].T).reshape(batch, oh, ow, kernel.shape[2])
      # Tap (i, j) of output pixel (y, x) read padded pixel (stride * y + i, stride * x + j);
      # the padded frame keeps the leading padding and ends with the input.
      config = [(0, 0, 0), (i, pad + height - 1 - (i + stride * (oh - 1)), stride - 1),
                (j, pad + width - 1 - (j + stride * (ow - 1)), stride - 1), (0, 0, 0)]
      part = lax.pad(part, jnp.zeros((), part.dtype), config)
      total = part if total is None else total + part
  return total[:, pad:pad + height, pad:pad + width]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_matmul_grad(x, kernel, stride: int):
  return conv_xla(x, kernel, stride)


def _conv_fwd(x, kernel, stride):
  return conv_xla(x, kernel, stride), (x, kernel)


def _conv_bwd(stride, residuals, grad):
  x, kernel = residuals
  return (input_gradient(grad, kernel, x.shape[1:3], stride),
          weight_gradient(x, grad, kernel.shape[0], stride))


_conv_matmul_grad.defvjp(_conv_fwd, _conv_bwd)


def conv_matmul_grad(x, kernel, stride: int):
  """`conv_xla`'s function; a 1x1 or strided convolution of at least 16 input channels is
  differentiated by matrix products, any other by XLA."""
  if kernel.shape[2] < _MIN_CHANNELS or (stride == 1 and kernel.shape[0] > 1):
    return conv_xla(x, kernel, stride)
  return _conv_matmul_grad(x, kernel, stride)


def make_conv(impl: str = "auto") -> Callable:
  """conv(x, kernel, stride) as `conv_xla`, differentiated per `impl`: "matmul_grad", "xla",
  or "auto" (the first on a CPU, the second on GPU and TPU)."""
  if impl not in IMPLS:
    raise ValueError(f"conv impl must be one of {IMPLS}, got {impl!r}.")
  if impl == "auto":
    impl = "matmul_grad" if jax.default_backend() == "cpu" else "xla"
  return conv_matmul_grad if impl == "matmul_grad" else conv_xla


class Conv(nn.Module):
  """A convolution with bias through `make_conv`, with flax `nn.Conv`'s parameter names
  ("kernel" [k, k, I, O], "bias" [O], stored float32) and PyTorch's padding for odd k, computed
  in `dtype`."""
  features: int
  kernel_size: int
  stride: int = 1
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  impl: str = "auto"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, I] -> [B, H', W', features] in `dtype`."""
    kernel = self.param("kernel", self.kernel_init,
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
    bias = self.param("bias", self.bias_init, (self.features,))
    y = make_conv(self.impl)(x.astype(self.dtype), kernel.astype(self.dtype), self.stride)
    return y + bias.astype(self.dtype)
