"""2-D convolutions, ordinary and depthwise (NHWC x HWIO; PyTorch's padding for odd kernels, or
explicit and possibly asymmetric padding such as TensorFlow's "SAME"), with gradients that a CPU
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
Explicit padding ((top, bottom), (left, right)) takes the same paths (the taps slice a padded
input with any two sides; each input-gradient part is placed with its own offset); a stem of 3
input channels, such as EfficientNet-Lite's, keeps XLA's gradients like any stem.

Depthwise convolutions (one k x k filter per channel: MobileNetV2, EfficientNet-Lite) differ:
XLA:CPU runs the grouped convolution (feature_group_count=C) and its input gradient 13-150x,
its weight gradient 2-100x slower than elementwise code does, so
`make_depthwise_conv("matmul_grad")`, the CPU form (it has no matrix product; the name is the
impl switch's), states all three as sums over taps:

  forward          y = sum over taps of X_ij * W[i, j] (X_ij [B, H', W', C] as above, W[i, j]
                   [C]): one fused loop
  input gradient   each of the stride**2 phases of the input is a stride-1 sum of that kind
                   over the taps that reach it (k=3, s=2: 4, 2, 2, 1 taps), the phases
                   interleaved; JAX's own transpose of the forward places every tap's product
                   with holes, multiplying stride**2 times as many zeros
  weight gradient  dW[i, j] = sum over batch and pixels of X_ij * G, per tap: the product and a
                   first sum of 8 row blocks in one fused loop, then XLA's reduce (JAX's own
                   transpose, a reduce with the product fused in, runs a scalar loop per channel)

bfloat16 operands accumulate in float32, as a convolution does. Measured at EfficientNet-Lite0's
depthwise layers, batch 4 at 384x384, float32, on 2 shared CPU cores (`python
benchmarks/bench_depthwise.py`; benchmarks/results/depthwise_cpu.json), ms, xla / matmul_grad:

  layer (TF "SAME")      forward       input grad     weight grad   forward+both
  [4,192,192,32] k3 s1   193 / 6.0     195 / 5.5      42 / 17       451 / 21
  [4,192,192,96] k3 s2   379 / 12.5    1023 / 8.1     160 / 48      1547 / 66
  [4,96,96,144] k5 s2    137 / 10.2    963 / 6.6      159 / 15      1115 / 26
  [4,48,48,240] k3 s2    27 / 1.7      124 / 1.0      23 / 2.4      197 / 3.4
  [4,24,24,480] k5 s1    75 / 2.7      70 / 2.2       194 / 4.5     336 / 7.1
  [4,24,24,672] k5 s2    34 / 1.9      258 / 1.8      130 / 2.1     495 / 4.2
  [4,12,12,1152] k3 s1   28 / 0.9      27 / 0.7       144 / 1.4     236 / 2.5

MobileNetV2's layers and bfloat16 gain alike (forward+both 11-96x). JAX's autodiff of the taps
forward gives an input gradient as fast or faster at stride 1 with k=3 in float32 (3.6 vs 5.5 ms
on the first layer), 3-10x slower at stride 2, k=5 or in bfloat16, and a weight gradient 4-20x
slower. "auto" takes this form on a CPU and XLA's
grouped convolution elsewhere (cuDNN and TPUs have depthwise kernels).
"""
import functools
import operator
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "matmul_grad", "xla")
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
# Inputs with fewer channels (an RGB stem) make per-tap products too thin to pay off.
_MIN_CHANNELS = 16
# Row blocks of `_sum_pixels`.
_SUM_BLOCKS = 8


Padding = tuple[tuple[int, int], tuple[int, int]]


def resolve_padding(kernel_size: int, padding: Padding | None) -> Padding:
  """((top, bottom), (left, right)) as a hashable tuple; None: PyTorch's (k - 1) // 2 on every
  side."""
  if padding is None:
    pad = (kernel_size - 1) // 2
    return ((pad, pad), (pad, pad))
  (top, bottom), (left, right) = padding
  return ((int(top), int(bottom)), (int(left), int(right)))


def same_padding(input_hw: tuple[int, int], kernel_size: int, stride: int) -> Padding:
  """TensorFlow's "SAME" padding of an [H, W] input: output ceil(n / stride), the odd pixel of
  padding at the end (k=3, s=2, even n: (0, 1); k=5, s=2: (1, 2))."""
  def one(n):
    total = max((-(-n // stride) - 1) * stride + kernel_size - n, 0)
    return (total // 2, total - total // 2)
  return (one(input_hw[0]), one(input_hw[1]))


def output_hw(input_hw: tuple[int, int], kernel_size: int | tuple[int, int], stride: int,
              padding: Padding) -> tuple[int, int]:
  """[H', W'] of a convolution: (n + before + after - k) // stride + 1."""
  kernel_hw = (kernel_size,) * 2 if isinstance(kernel_size, int) else kernel_size
  return tuple((n + sum(pad) - k) // stride + 1
               for n, pad, k in zip(input_hw, padding, kernel_hw))


def conv_xla(x, kernel, stride: int, padding: Padding | None = None):
  """x [B, H, W, I] * kernel [k, k, I, O] -> [B, H', W', O]; padding ((top, bottom), (left,
  right)), None: (k - 1) // 2 on every side as in PyTorch (k odd)."""
  return lax.conv_general_dilated(x, kernel, (stride, stride),
                                  resolve_padding(kernel.shape[0], padding),
                                  dimension_numbers=_DIMENSIONS)


def _pad_spatial(x, padding: Padding):
  """Zero padding of the two spatial axes of [B, H, W, C]; a negative amount crops."""
  if padding == ((0, 0), (0, 0)):
    return x
  (top, bottom), (left, right) = padding
  return lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (top, bottom, 0), (left, right, 0),
                                             (0, 0, 0)])


def _tap_inputs(x, kernel_hw: tuple[int, int], stride: int, padding: Padding,
                out_hw: tuple[int, int]) -> list:
  """For each tap (i, j) of a [kh, kw] kernel, row-major: the input pixels it reads,
  [B, H', W', C]."""
  padded = _pad_spatial(x, padding)
  oh, ow = out_hw
  limit = lambda i, n: i + stride * (n - 1) + 1
  return [lax.slice(padded, (0, i, j, 0), (x.shape[0], limit(i, oh), limit(j, ow), x.shape[3]),
                    (1, stride, stride, 1))
          for i in range(kernel_hw[0]) for j in range(kernel_hw[1])]


def weight_gradient(x, grad, kernel_size: int, stride: int, padding: Padding | None = None):
  """dL/dW [k, k, I, O] from the input x [B, H, W, I] and the output gradient [B, H', W', O]."""
  padding = resolve_padding(kernel_size, padding)
  grad2d = grad.reshape(-1, grad.shape[-1])
  taps = [tap.reshape(-1, tap.shape[-1]).T @ grad2d
          for tap in _tap_inputs(x, (kernel_size,) * 2, stride, padding, grad.shape[1:3])]
  return jnp.stack(taps).reshape(kernel_size, kernel_size, x.shape[-1], grad.shape[-1])


def input_gradient(grad, kernel, input_hw: tuple[int, int], stride: int,
                   padding: Padding | None = None):
  """dL/dX [B, H, W, I] from the output gradient [B, H', W', O] and kernel [k, k, I, O]."""
  k = kernel.shape[0]
  (top, _), (left, _) = resolve_padding(k, padding)
  batch, oh, ow, channels = grad.shape
  height, width = input_hw
  grad2d = grad.reshape(-1, channels)
  total = None
  for i in range(k):
    for j in range(k):
      part = (grad2d @ kernel[i, j].T).reshape(batch, oh, ow, kernel.shape[2])
      # Tap (i, j) of output pixel (y, x) read padded pixel (stride * y + i, stride * x + j):
      # placed with holes, shifted by the leading padding, cut to the input (a negative
      # amount crops).
      config = [(0, 0, 0), (i - top, top + height - 1 - (i + stride * (oh - 1)), stride - 1),
                (j - left, left + width - 1 - (j + stride * (ow - 1)), stride - 1), (0, 0, 0)]
      part = lax.pad(part, jnp.zeros((), part.dtype), config)
      total = part if total is None else total + part
  return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_matmul_grad(x, kernel, stride: int, padding: Padding):
  return conv_xla(x, kernel, stride, padding)


def _conv_fwd(x, kernel, stride, padding):
  return conv_xla(x, kernel, stride, padding), (x, kernel)


def _conv_bwd(stride, padding, residuals, grad):
  x, kernel = residuals
  return (input_gradient(grad, kernel, x.shape[1:3], stride, padding),
          weight_gradient(x, grad, kernel.shape[0], stride, padding))


_conv_matmul_grad.defvjp(_conv_fwd, _conv_bwd)


def conv_matmul_grad(x, kernel, stride: int, padding: Padding | None = None):
  """`conv_xla`'s function; a 1x1 or strided convolution of at least 16 input channels is
  differentiated by matrix products, any other by XLA."""
  padding = resolve_padding(kernel.shape[0], padding)
  if kernel.shape[2] < _MIN_CHANNELS or (stride == 1 and kernel.shape[0] > 1):
    return conv_xla(x, kernel, stride, padding)
  return _conv_matmul_grad(x, kernel, stride, padding)


def _platform_impl(impl: str) -> str:
  """`impl` checked, with "auto" resolved: "matmul_grad" on a CPU, "xla" on GPU and TPU."""
  if impl not in IMPLS:
    raise ValueError(f"conv impl must be one of {IMPLS}, got {impl!r}.")
  if impl == "auto":
    return "matmul_grad" if jax.default_backend() == "cpu" else "xla"
  return impl


def make_conv(impl: str = "auto") -> Callable:
  """conv(x, kernel, stride, padding=None) as `conv_xla`, differentiated per `impl`:
  "matmul_grad", "xla", or "auto" (the first on a CPU, the second on GPU and TPU)."""
  return conv_matmul_grad if _platform_impl(impl) == "matmul_grad" else conv_xla


def depthwise_conv_xla(x, kernel, stride: int, padding: Padding | None = None):
  """Depthwise x [B, H, W, C] * kernel [k, k, 1, C] (one k x k filter per channel, XLA's
  grouped-convolution layout) -> [B, H', W', C]; padding as `conv_xla`."""
  return lax.conv_general_dilated(x, kernel, (stride, stride),
                                  resolve_padding(kernel.shape[0], padding),
                                  dimension_numbers=_DIMENSIONS, feature_group_count=x.shape[-1])


def _accumulation_dtype(dtype):
  """float32 for bfloat16 and float16 operands (as a convolution accumulates), else dtype."""
  return jnp.promote_types(dtype, jnp.float32)


def depthwise_taps(x, kernel, stride: int, padding: Padding):
  """`depthwise_conv_xla`'s function as a sum over taps of the pixels each reads times its
  per-channel weights: elementwise, one fused loop on XLA:CPU. Differentiated by JAX as it
  stands (`benchmarks/bench_depthwise.py` measures that); `depthwise_conv_taps` has the fast
  gradients. The kernel [kh, kw, 1, C] may be non-square (`depthwise_input_gradient`)."""
  kh, kw = kernel.shape[:2]
  acc = _accumulation_dtype(x.dtype)
  taps = _tap_inputs(x, (kh, kw), stride, padding,
                     output_hw(x.shape[1:3], (kh, kw), stride, padding))
  total = functools.reduce(operator.add, [tap.astype(acc) * kernel[t // kw, t % kw, 0].astype(acc)
                                          for t, tap in enumerate(taps)])
  return total.astype(jnp.result_type(x, kernel))


def depthwise_input_gradient(grad, kernel, input_hw: tuple[int, int], stride: int,
                             padding: Padding):
  """dL/dX [B, H, W, C] from the output gradient [B, H', W', C] and kernel [k, k, 1, C].

  Padded row r = stride * q + py gets grad[q - a] * kernel[stride * a + py] for each a: for each
  phase (py, px) a stride-1 depthwise correlation of grad with the flipped sub-kernel
  kernel[py::stride, px::stride], and the stride**2 phases interleaved. Only real taps are
  multiplied, where placing each tap's product with holes (`input_gradient`) adds stride**2
  times as many zeros."""
  batch, oh, ow, channels = grad.shape
  # Each phase's rows q in [q0, q1) and columns in [c0, c1) cover the input's padded pixels.
  (q0, q1), (c0, c1) = [(before // stride, -(-(before + n) // stride))
                        for n, (before, _) in zip(input_hw, padding)]
  phase_rows = []
  for py in range(stride):
    phase_row = []
    for px in range(stride):
      sub = kernel[py::stride, px::stride][::-1, ::-1]
      sh, sw = sub.shape[:2]
      if sh == 0 or sw == 0:  # a kernel smaller than the stride: no tap reads this phase
        phase_row.append(jnp.zeros((batch, q1 - q0, c1 - c0, channels), grad.dtype))
      else:
        phase_row.append(depthwise_taps(grad, sub, 1, ((sh - 1 - q0, q1 - oh),
                                                       (sw - 1 - c0, c1 - ow))))
    phase_rows.append(jnp.stack(phase_row, axis=3))
  full = jnp.stack(phase_rows, axis=2).reshape(batch, stride * (q1 - q0), stride * (c1 - c0),
                                               channels)
  (top, _), (left, _) = padding
  y0, x0 = top - stride * q0, left - stride * c0
  return full[:, y0:y0 + input_hw[0], x0:x0 + input_hw[1]]


def _sum_pixels(product):
  """[B, H, W, C] -> [C]. The rows are first added in 8 blocks by elementwise adds, which XLA:CPU
  fuses with the product into one vectorized loop; the [N / 8, C] partial sum is then a plain
  reduce, which XLA:CPU runs fast on its own but slowly (one scalar loop per channel) when the
  product is fused into it. Eight blocks: XLA fuses a producer used at most 8 times."""
  rows = product.reshape(-1, product.shape[-1])
  n = rows.shape[0]
  per_block = -(-n // _SUM_BLOCKS)
  rows = jnp.pad(rows, ((0, _SUM_BLOCKS * per_block - n), (0, 0)))
  blocks = rows.reshape(_SUM_BLOCKS, per_block, rows.shape[-1])
  return functools.reduce(operator.add, [blocks[b] for b in range(_SUM_BLOCKS)]).sum(0)


def depthwise_weight_gradient(x, grad, kernel_size: int, stride: int, padding: Padding):
  """dL/dW [k, k, 1, C] from the input x [B, H, W, C] and the output gradient [B, H', W', C]:
  per tap, the sum over batch and pixels of the pixels it reads times grad."""
  acc = _accumulation_dtype(x.dtype)
  grad = grad.astype(acc)
  sums = [_sum_pixels(tap.astype(acc) * grad)
          for tap in _tap_inputs(x, (kernel_size,) * 2, stride, padding, grad.shape[1:3])]
  return jnp.stack(sums).reshape(kernel_size, kernel_size, 1, grad.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_taps_vjp(x, kernel, stride: int, padding: Padding):
  return depthwise_taps(x, kernel, stride, padding)


def _depthwise_fwd(x, kernel, stride, padding):
  return depthwise_taps(x, kernel, stride, padding), (x, kernel)


def _depthwise_bwd(stride, padding, residuals, grad):
  x, kernel = residuals
  dx = depthwise_input_gradient(grad, kernel, x.shape[1:3], stride, padding)
  dw = depthwise_weight_gradient(x, grad, kernel.shape[0], stride, padding)
  return dx.astype(x.dtype), dw.astype(kernel.dtype)


_depthwise_taps_vjp.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_conv_taps(x, kernel, stride: int, padding: Padding | None = None):
  """`depthwise_conv_xla`'s function, computed and differentiated by sums over taps."""
  return _depthwise_taps_vjp(x, kernel, stride, resolve_padding(kernel.shape[0], padding))


def make_depthwise_conv(impl: str = "auto") -> Callable:
  """depthwise_conv(x [B, H, W, C], kernel [k, k, 1, C], stride, padding=None) -> [B, H', W', C]
  (from a PyTorch weight w [C, 1, k, k]: w.transpose(2, 3, 1, 0)), per `impl`: "xla" (XLA's
  grouped convolution and its gradients: cuDNN and TPUs have depthwise kernels), "matmul_grad"
  (the CPU form, `depthwise_conv_taps`), or "auto" (the second on a CPU, the first elsewhere)."""
  if _platform_impl(impl) == "matmul_grad":
    return depthwise_conv_taps
  return depthwise_conv_xla


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
