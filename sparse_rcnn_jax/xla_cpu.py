"""XLA:CPU compiler options for the jitted train, predict and benchmark programs.

jaxlib 0.10.2's XLA:CPU hands convolutions to YNNPACK by default. Its weight gradient is then
one convolution whose window is the whole output map, which YNNPACK runs 5-10x slower than
the forward convolution (a 1x1 conv on [1, 200, 304, 256]: forward 60 ms, weight gradient
480-660 ms). With YNNPACK's fusions off, the same convolutions run on XLA's Eigen kernels: the
weight gradient takes ~100 ms and the forward is no slower. `benchmarks/compare_official.py
--ynnpack` measures the whole model both ways.

The options go to each `jax.jit` (`compiler_options=`), so importing this package changes no
global state. A user who sets the same flag in XLA_FLAGS keeps their own value.
"""
import os

import jax

# An empty list of YNNPACK fusion kinds: dots and convolutions go to XLA's own kernels.
_YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"


def compiler_options(ynnpack: bool = False) -> dict[str, str] | None:
  """Options for `jax.jit(..., compiler_options=...)`: None off the CPU, when `ynnpack`, or
  when XLA_FLAGS already names the flag."""
  if ynnpack or jax.default_backend() != "cpu":
    return None
  if _YNN_FUSION_FLAG in os.environ.get("XLA_FLAGS", ""):
    return None
  return {_YNN_FUSION_FLAG: ""}
