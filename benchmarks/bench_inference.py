"""Whole-model inference: compile time, time per image and peak memory.

  python benchmarks/bench_inference.py                  # R-50 100/300 proposals at 800x1216, tiny
  python benchmarks/bench_inference.py --models tiny    # just the tiny config

Random weights (speed does not depend on them); batch 1 at the test resolution (short side
800, long side at most 1333).
"""
import argparse
import sys
import pathlib

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import common  # pylint: disable=g-import-not-at-top
from configs import r50_100pro_3x, r50_300pro_3x, r101_100pro_3x, tiny
from sparse_rcnn_jax.evaluation import postprocess
from sparse_rcnn_jax.model import detector

MODELS = {
    "r50_100pro": (r50_100pro_3x, (800, 1216)),
    "r50_300pro": (r50_300pro_3x, (800, 1216)),
    "r101_100pro": (r101_100pro_3x, (800, 1216)),
    "tiny": (tiny, (128, 128)),
}


def bench_config(config, height: int, width: int, batch: int, repeats: int) -> dict:
  """Compile time, time per image and peak memory of the jitted inference of `config.model`
  (random weights) on [batch, height, width, 3] images, post-processing included."""
  model = detector.build_model(config.model)
  images = jnp.zeros((batch, height, width, 3), jnp.uint8)
  whwh = jnp.tile(jnp.array([[width, height, width, height]], jnp.float32), (batch, 1))
  orig = jnp.tile(jnp.array([[height, width]], jnp.int32), (batch, 1))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images, whwh)

  @jax.jit
  def infer(variables, images, whwh, orig):
    out = model.apply(variables, images, whwh)
    return postprocess.postprocess(out["pred_logits"][-1], out["pred_boxes"][-1], whwh, orig)

  compile_s, step_s, compiled = common.time_compiled(infer, variables, images, whwh, orig,
                                                     repeats=repeats)
  params = sum(x.size for x in jax.tree.leaves(variables["params"]))
  return {"image": f"{height}x{width}", "batch": batch, "dtype": config.model.dtype,
          "params_M": params / 1e6, "compile_s": compile_s, "ms_per_image": 1e3 * step_s / batch,
          "images_per_s": batch / step_s, "program_mb": common.program_mb(compiled),
          **common.peak_memory_mb()}


def bench(name: str, batch: int, repeats: int) -> dict:
  module, (height, width) = MODELS[name]
  return {"model": name, **bench_config(module.get_config(), height, width, batch, repeats)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["tiny", "r50_100pro", "r50_300pro"],
                      choices=sorted(MODELS))
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  rows = [bench(m, args.batch, args.repeats) for m in args.models]
  common.report("inference", rows, ["model", "image", "batch", "params_M", "compile_s",
                                    "ms_per_image", "images_per_s", "host_peak_rss_mb",
                                    "device_peak_mb"])


if __name__ == "__main__":
  main()
