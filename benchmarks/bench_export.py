"""Latency of the exported detector: onnxruntime vs the jax.export artifact vs jit.

  python benchmarks/bench_export.py                      # tiny and the custom recipe, batch 1, 8
  python benchmarks/bench_export.py --models tiny --batches 1

The whole inference (serving.py's contract: uint8 images and image_whwh in, top-k detections
out), random weights (speed does not depend on them), each model at its own test size, in
this process on this machine's CPU cores: jit of the detect function (the CPU forms the
predict function uses), the same program exported with a symbolic batch, serialized,
deserialized and called (it carries no compiler options), and the ONNX model
(onnx_export.py, the forms it holds) in an onnxruntime session with its default threads.
Needs the export extra: pip install --no-deps -r requirements-export.txt.
"""
import argparse
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import common  # pylint: disable=g-import-not-at-top
from configs import custom, tiny
from sparse_rcnn_jax.evaluation import onnx_export
from sparse_rcnn_jax.evaluation import serving
from sparse_rcnn_jax.model import detector

NUM_CLASSES = 3
MODELS = {
    "tiny": (tiny.get_config, (128, 160)),
    "custom": (custom.get_config, (256, 352)),  # the recipe's test size, landscape
}


def _variables(model: detector.SparseRCNN) -> dict:
  side = 2 * model.backbone.size_divisibility
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, side, side, 3), np.uint8),
                                  np.ones((1, 4), np.float32))
  return jax.tree.map(np.asarray, variables)


def _inputs(batch: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
  return images, np.tile(np.array([[width, height, width, height]], np.float32), (batch, 1))


def _seconds_per_call(call, repeats: int) -> tuple[float, float]:
  """(first call's seconds: compilation included, mean seconds of the next `repeats`)."""
  start = time.perf_counter()
  jax.block_until_ready(call())
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(call())
  return first, (time.perf_counter() - start) / repeats


def bench(name: str, batches: list[int], repeats: int) -> list[dict]:
  import onnxruntime  # pylint: disable=g-import-not-at-top
  get_config, (height, width) = MODELS[name]
  config = get_config()
  config.model.backbone.weights = ""  # random weights: no file to read
  cpu_model = serving.serving_model(config.model, NUM_CLASSES, ["cpu"])
  variables = _variables(cpu_model)
  start = time.perf_counter()
  blob = onnx_export.export_onnx(onnx_export.onnx_model(config.model, NUM_CLASSES), variables,
                                 height, width)
  convert_s = time.perf_counter() - start
  session = onnxruntime.InferenceSession(blob, providers=["CPUExecutionProvider"])
  exported = jax.export.deserialize(bytearray(serving.serialize(
      serving.export_detector(cpu_model, variables, height, width))))
  jitted = jax.jit(serving.detect_fn(cpu_model, variables))
  called = jax.jit(exported.call)
  rows = []
  for batch in batches:
    images, whwh = _inputs(batch, height, width)
    runtimes = {
        "jit": lambda: jitted(images, whwh),
        "jax.export": lambda: called(images, whwh),
        "onnxruntime": lambda: session.run(None, {"images": images, "image_whwh": whwh}),
    }
    times = {k: _seconds_per_call(call, repeats) for k, call in runtimes.items()}
    for runtime, (first_s, per_call_s) in times.items():
      rows.append({"model": name, "image": f"{height}x{width}", "batch": batch,
                   "runtime": runtime, "first_call_s": first_s,
                   "ms_per_image": 1e3 * per_call_s / batch, "images_per_s": batch / per_call_s,
                   "vs_jit": per_call_s / times["jit"][1],
                   "onnx_convert_s": convert_s if runtime == "onnxruntime" else None,
                   "onnx_mb": len(blob) / 2**20 if runtime == "onnxruntime" else None})
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
  parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  rows = [row for name in args.models for row in bench(name, args.batches, args.repeats)]
  common.report("export", rows, ["model", "image", "batch", "runtime", "first_call_s",
                                 "ms_per_image", "images_per_s", "vs_jit", "onnx_convert_s",
                                 "onnx_mb"])


if __name__ == "__main__":
  main()
