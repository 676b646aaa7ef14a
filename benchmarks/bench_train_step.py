"""Train-step time: the jitted update (forward, set-prediction loss with host matching,
backward, AdamW) of the trainer, with its compile time and peak memory.

  python benchmarks/bench_train_step.py                        # tiny, synthetic, bccd configs
  python benchmarks/bench_train_step.py --models r50_100pro --batch 2 --repeats 2

Random weights and random ground truth (speed does not depend on them); every device in one
data-parallel mesh, as train.py runs. Sizes are each config's largest training bucket.
"""
import argparse
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import common  # pylint: disable=g-import-not-at-top
from configs import bccd, r50_100pro_3x, r50_300pro_3x, synthetic, tiny
from sparse_rcnn_jax import sharding
from sparse_rcnn_jax.data import pipeline
from sparse_rcnn_jax.data import synthetic as synthetic_data
from sparse_rcnn_jax.model import detector
from sparse_rcnn_jax.training import model_state, trainer

# Config module and the number of classes of its dataset (None: the config's own).
MODELS = {
    "tiny": (tiny, None),
    "synthetic": (synthetic, len(synthetic_data.CLASS_NAMES)),
    "bccd": (bccd, 3),
    "r50_100pro": (r50_100pro_3x, 80),
    "r50_300pro": (r50_300pro_3x, 80),
}


def random_batch(config, batch: int, height: int, width: int, num_classes: int,
                 seed: int = 0) -> dict[str, np.ndarray]:
  """A batch in the data pipeline's format with random images and 1..max_boxes random boxes."""
  rng = np.random.default_rng(seed)
  m = config.data.max_boxes
  xy = rng.uniform(0, 0.7, (batch, m, 2)) * (width, height)
  wh = rng.uniform(0.05, 0.3, (batch, m, 2)) * (width, height)
  counts = rng.integers(1, m + 1, batch)
  return {
      "image": rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8),
      "image_whwh": np.tile(np.float32([width, height, width, height]), (batch, 1)),
      "orig_size": np.tile(np.int32([height, width]), (batch, 1)),
      "image_id": np.arange(batch, dtype=np.int64),
      "gt_boxes": np.concatenate([xy, xy + wh], -1).astype(np.float32),
      "gt_labels": rng.integers(0, num_classes, (batch, m)).astype(np.int32),
      "gt_mask": np.arange(m)[None] < counts[:, None],
      "valid": np.ones(batch, bool),
  }


def prepare(config, batch: int, height: int, width: int):
  """The trainer's jitted step for `config` (random weights), its state and a random batch of
  [batch, height, width] on the mesh of every device, as train.py runs."""
  config.data.batch_size = batch
  mesh = sharding.make_mesh()
  model = detector.build_model(config.model)
  state = jax.device_put(model_state.new_state(model, config),
                         sharding.replicated(mesh))
  step = trainer.make_train_step(model, config, mesh, state)
  data = jax.device_put(random_batch(config, batch, height, width, config.model.num_classes),
                        sharding.batch_sharded(mesh))
  return step, state, data


def time_steps(step, state, data, repeats: int) -> dict:
  """Compile seconds, median seconds per step, the last loss and the memory of the compiled
  program (common.program_mb) of `step` from `prepare`."""
  start = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - start
  state, _ = compiled(state, data)  # warm-up (the state is donated, so thread it through)
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  return {"compile_s": compile_s, "step_s": float(np.median(times)),
          "loss": float(metrics["loss"]), "program_mb": common.program_mb(compiled)}


def bench(name: str, batch: int | None, repeats: int) -> dict:
  module, num_classes = MODELS[name]
  config = module.get_config()
  if num_classes is not None:
    config.model.num_classes = num_classes
  batch = batch or config.data.batch_size
  config.data.batch_size = batch
  multiple = detector.build_model(config.model).backbone.size_divisibility
  height, width = max(pipeline.batch_shapes(config.data, "train", size_divisibility=multiple),
                      key=lambda s: s[0] * s[1])
  step, state, data = prepare(config, batch, height, width)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  timed = time_steps(step, state, data, repeats)
  return {"model": name, "image": f"{height}x{width}", "batch": batch,
          "stages": config.model.num_stages, "proposals": config.model.num_proposals,
          "params_M": params / 1e6, "compile_s": timed["compile_s"],
          "step_ms": 1e3 * timed["step_s"], "images_per_s": batch / timed["step_s"],
          "loss": timed["loss"], **common.peak_memory_mb()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["tiny", "synthetic", "bccd"],
                      choices=sorted(MODELS))
  parser.add_argument("--batch", type=int, default=None, help="default: the config's")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  rows = [bench(m, args.batch, args.repeats) for m in args.models]
  common.report("train_step", rows, ["model", "image", "batch", "stages", "proposals",
                                     "params_M", "compile_s", "step_ms", "images_per_s",
                                     "host_peak_rss_mb", "device_peak_mb"])


if __name__ == "__main__":
  main()
