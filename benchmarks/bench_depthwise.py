"""Depthwise convolution on XLA: forward, input gradient, weight gradient and all three, per form,
at the depthwise layers of EfficientNet-Lite0 and MobileNetV2 on a batch of 384x384 images.

  python benchmarks/bench_depthwise.py                      # ~3 min on 2 CPU cores
  python benchmarks/bench_depthwise.py --dtypes float32 bfloat16   # results/depthwise_cpu.json
  python benchmarks/bench_depthwise.py --forms xla matmul_grad --layers 3

Forms (each column jitted alone, with the options train.py uses; the median of up to --repeats
runs, interleaved across forms; a program stops after 3 runs once they add up to --budget-s):
  xla             XLA's grouped convolution (feature_group_count=C) and XLA's gradients
  taps_autodiff   conv.depthwise_taps (a sum over taps of strided slices times per-channel
                  weights) differentiated by JAX: the input gradient places each tap's product
                  with holes (lax.pad with interior padding), the weight gradient is one reduce
                  of slice * gradient per tap
  matmul_grad     conv.make_depthwise_conv("matmul_grad"): the same forward; the input gradient
                  by stride**2 phases, each a stride-1 sum over its own taps; the weight gradient
                  per tap with the pixels first added in 8 blocks (conv._sum_pixels)
  xla+taps_grads  XLA's forward with matmul_grad's gradients (jax.custom_vjp)
The mixture differs from the forms it mixes only in the full pass: its other columns are the
measured columns of those forms. "vs_xla" is xla's fwd_bwd_ms over the row's.
"""
import argparse
import functools
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import common  # pylint: disable=g-import-not-at-top
from sparse_rcnn_jax import xla_cpu
from sparse_rcnn_jax.model import conv

# Depthwise layers at a 384x384 input: (model, [B, H, W, C], kernel, stride). EfficientNet-Lite
# pads as TensorFlow's "SAME", MobileNetV2 (k - 1) // 2 on every side.
LAYERS = [
    ("effnet_lite0", (4, 192, 192, 32), 3, 1),
    ("effnet_lite0", (4, 192, 192, 96), 3, 2),
    ("effnet_lite0", (4, 96, 96, 144), 5, 2),
    ("effnet_lite0", (4, 48, 48, 240), 3, 2),
    ("effnet_lite0", (4, 24, 24, 480), 5, 1),
    ("effnet_lite0", (4, 24, 24, 672), 5, 2),
    ("effnet_lite0", (4, 12, 12, 1152), 3, 1),
    ("mobilenet_v2", (4, 96, 96, 144), 3, 1),
    ("mobilenet_v2", (4, 48, 48, 192), 3, 2),
    ("mobilenet_v2", (4, 24, 24, 384), 3, 1),
    ("mobilenet_v2", (4, 12, 12, 960), 3, 1),
]
FORMS = ("xla", "taps_autodiff", "matmul_grad", "xla+taps_grads")
# A mixture: (forward from, gradients from).
MIXTURES = {"xla+taps_grads": ("xla", "matmul_grad")}
MIN_REPEATS = 3
COLUMNS = ("fwd_ms", "dx_ms", "dw_ms", "fwd_bwd_ms")


def _mixture(forward, backward):
  """forward's values with backward's gradients."""
  @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
  def fn(x, kernel, stride, padding):
    return forward(x, kernel, stride, padding)

  def fwd(x, kernel, stride, padding):
    return forward(x, kernel, stride, padding), (x, kernel)

  def bwd(stride, padding, residuals, grad):
    x, kernel = residuals
    return jax.vjp(lambda x, k: backward(x, k, stride, padding), x, kernel)[1](grad)

  fn.defvjp(fwd, bwd)
  return fn


def form_fn(form: str):
  """fn(x, kernel, stride, padding) of a form."""
  if form in MIXTURES:
    forward, backward = MIXTURES[form]
    return _mixture(form_fn(forward), form_fn(backward))
  if form == "taps_autodiff":
    return lambda x, k, s, p: conv.depthwise_taps(x, k, s, conv.resolve_padding(k.shape[0], p))
  return conv.make_depthwise_conv(form)


def column_fns(fn, stride: int, padding) -> dict:
  """The jitted programs of the four columns: (x, kernel, output gradient) -> arrays."""
  conv_fn = lambda x, k: fn(x, k, stride, padding)
  return {
      "fwd_ms": lambda x, k, g: conv_fn(x, k),
      "dx_ms": lambda x, k, g: jax.vjp(lambda x: conv_fn(x, k), x)[1](g)[0],
      "dw_ms": lambda x, k, g: jax.vjp(lambda k: conv_fn(x, k), k)[1](g)[0],
      "fwd_bwd_ms": lambda x, k, g: (lambda y, vjp: (y, *vjp(g)))(*jax.vjp(conv_fn, x, k)),
  }


def time_interleaved(programs: dict, args, repeats: int, budget_s: float) -> dict:
  """Median milliseconds of each compiled program, run in turn up to `repeats` times; one that
  has run MIN_REPEATS times for `budget_s` seconds in all stops (XLA's forms take seconds)."""
  times = {name: [] for name in programs}
  for name, compiled in programs.items():
    jax.block_until_ready(compiled(*args))  # warm-up
  for _ in range(repeats):
    for name, compiled in programs.items():
      if len(times[name]) >= MIN_REPEATS and sum(times[name]) > budget_s:
        continue
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times[name].append(time.perf_counter() - start)
  return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def measure_layer(model, shape, k, stride, dtype, forms, repeats, budget_s) -> list[dict]:
  """One row per form at one layer."""
  batch, height, width, channels = shape
  padding = (conv.same_padding((height, width), k, stride) if model == "effnet_lite0"
             else conv.resolve_padding(k, None))
  out_hw = conv.output_hw((height, width), k, stride, padding)
  key = jax.random.PRNGKey(0)
  args = (jax.random.normal(key, shape, dtype),
          jax.random.normal(jax.random.fold_in(key, 1), (k, k, 1, channels), dtype),
          jax.random.normal(jax.random.fold_in(key, 2), (batch, *out_hw, channels), dtype))
  options = xla_cpu.compiler_options()
  programs = {}
  for form in forms:
    for column, fn in column_fns(form_fn(form), stride, padding).items():
      if form in MIXTURES and column != "fwd_bwd_ms":
        continue
      programs[(form, column)] = jax.jit(fn, compiler_options=options).lower(*args).compile()
  ms = time_interleaved(programs, args, repeats, budget_s)
  for form in forms:  # a mixture's other columns are those of the forms it mixes
    if form in MIXTURES:
      forward, backward = MIXTURES[form]
      for column in COLUMNS[:3]:
        source = forward if column == "fwd_ms" else backward
        ms[(form, column)] = ms.get((source, column))
  rows = []
  for form in forms:
    rows.append({"model": model, "shape": "x".join(map(str, shape)), "k": k, "stride": stride,
                 "padding": str(padding), "dtype": jnp.dtype(dtype).name, "form": form,
                 **{column: ms[(form, column)] for column in COLUMNS}})
  if "xla" in forms:
    for row in rows:
      row["vs_xla"] = ms[("xla", "fwd_bwd_ms")] / row["fwd_bwd_ms"]
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dtypes", nargs="+", default=["float32"],
                      choices=["float32", "bfloat16"])
  parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
  parser.add_argument("--layers", type=int, default=len(LAYERS), help="the first N layers")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--budget-s", type=float, default=1.0)
  args = parser.parse_args()
  rows = []
  for dtype in args.dtypes:
    for model, shape, k, stride in LAYERS[:args.layers]:
      rows += measure_layer(model, shape, k, stride, jnp.dtype(dtype), args.forms,
                            args.repeats, args.budget_s)
      print(f"{model} {shape} k{k} s{stride} {dtype}: done", flush=True)
  common.report("depthwise", rows, ["model", "shape", "k", "stride", "dtype", "form",
                                    *COLUMNS, "vs_xla"])


if __name__ == "__main__":
  main()
