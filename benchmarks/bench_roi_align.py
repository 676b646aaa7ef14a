"""Multi-level RoIAlign forward and forward+backward at the official sizes.

  python benchmarks/bench_roi_align.py
  python benchmarks/bench_roi_align.py --impls gather separable --proposals 100

FPN maps of an 800x1216 batch (256 channels, P2-P5), random boxes of all sizes, 7x7 output,
sampling ratio 2. Backward is the gradient with respect to the feature maps. Compiled with the
options train.py uses.
"""
import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import common  # pylint: disable=g-import-not-at-top
from sparse_rcnn_jax import xla_cpu
from sparse_rcnn_jax.model.roi_align import multilevel_roi_align


def inputs(batch: int, num_boxes: int, height: int, width: int, channels: int):
  key = jax.random.PRNGKey(0)
  maps = [jax.random.normal(jax.random.fold_in(key, s), (batch, height // s, width // s, channels))
          for s in (4, 8, 16, 32)]
  k1, k2 = jax.random.split(jax.random.fold_in(key, 99))
  xy = jax.random.uniform(k1, (batch, num_boxes, 2)) * jnp.array([width, height])
  wh = jnp.exp(jax.random.uniform(k2, (batch, num_boxes, 2), minval=jnp.log(8.0),
                                  maxval=jnp.log(800.0)))
  return maps, jnp.concatenate([xy - wh / 2, xy + wh / 2], axis=-1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--proposals", type=int, nargs="+", default=[100, 300])
  parser.add_argument("--channels", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--impls", nargs="+", default=["gather"], choices=["gather", "separable"])
  args = parser.parse_args()
  options = xla_cpu.compiler_options()
  rows = []
  for impl in args.impls:
    pool = lambda m, b, impl=impl: multilevel_roi_align(m, b, impl=impl)[0]
    forward = jax.jit(pool, compiler_options=options)
    backward = jax.jit(jax.grad(lambda m, b: jnp.sum(pool(m, b) ** 2)),
                       compiler_options=options)
    for n in args.proposals:
      maps, boxes = inputs(args.batch, n, 800, 1216, args.channels)
      for name, fn in (("forward", forward), ("forward+backward", backward)):
        compile_s, step_s, _ = common.time_compiled(fn, maps, boxes, repeats=args.repeats)
        rows.append({"impl": impl, "pass": name, "batch": args.batch, "proposals": n,
                     "channels": args.channels, "compile_s": compile_s, "ms": 1e3 * step_s,
                     "us_per_box": 1e6 * step_s / (args.batch * n), **common.peak_memory_mb()})
  common.report("roi_align", rows, ["impl", "pass", "batch", "proposals", "channels",
                                    "compile_s", "ms", "us_per_box", "host_peak_rss_mb",
                                    "device_peak_mb"])


if __name__ == "__main__":
  main()
