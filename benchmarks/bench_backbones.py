"""Each backbone inside the custom recipe's detector: train step and inference, beside the
from-scratch ResNet-18 (configs/custom.py:scratch).

  python benchmarks/bench_backbones.py
  python benchmarks/bench_backbones.py --backbones efficientnet_lite0 resnet18_scratch --repeats 3

The detector is configs/custom.py's (its head, image sizes and batch) with each backbone; random
weights (speed does not depend on them). The train step runs at the recipe's largest training
bucket and batch; inference at its test size, batch 1 and 8, post-processing included.
"""
import argparse
import pathlib
import sys

import ml_collections

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import bench_inference, bench_train_step, common  # pylint: disable=g-import-not-at-top
from configs import custom
from sparse_rcnn_jax.data import pipeline
from sparse_rcnn_jax.evaluation import serving
from sparse_rcnn_jax.model import detector

# Name -> (recipe of configs/custom.py, backbone fields).
BACKBONES = {
    "resnet18_scratch": ("scratch", None),
    "efficientnet_lite0": ("", dict(name="efficientnet_lite", variant=0)),
    "efficientnet_lite1": ("", dict(name="efficientnet_lite", variant=1)),
    "efficientnet_lite2": ("", dict(name="efficientnet_lite", variant=2)),
    "mobilenet_v2": ("", dict(name="mobilenet_v2")),
}


def config_of(name: str) -> ml_collections.ConfigDict:
  recipe, backbone = BACKBONES[name]
  config = custom.get_config(recipe)
  if backbone is not None:
    config.model.backbone.update(backbone)
  config.model.backbone.weights = ""  # random weights: the same speed, no package needed
  config.model.num_classes = 3
  return config


def bench(name: str, repeats: int) -> list[dict]:
  print(f"{name}: compiling and timing the train step, then inference at batch 1 and 8",
        file=sys.stderr, flush=True)
  config = config_of(name)
  multiple = detector.build_model(config.model).backbone.size_divisibility
  height, width = max(pipeline.batch_shapes(config.data, "train", size_divisibility=multiple),
                      key=lambda s: s[0] * s[1])
  batch = config.data.batch_size
  step, state, data = bench_train_step.prepare(config, batch, height, width)
  timed = bench_train_step.time_steps(step, state, data, repeats)
  rows = [{"backbone": name, "part": "train step", "image": f"{height}x{width}", "batch": batch,
           "compile_s": timed["compile_s"], "ms_per_image": 1e3 * timed["step_s"] / batch,
           "images_per_s": batch / timed["step_s"]}]
  height, width = serving.default_image_size(config.data, multiple)
  for b in (1, 8):
    row = bench_inference.bench_config(config, height, width, b, repeats)
    rows.append({"backbone": name, "part": "inference", **row})
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  rows = [row for name in args.backbones for row in bench(name, args.repeats)]
  common.report("backbones", rows, ["backbone", "part", "image", "batch", "compile_s",
                                    "ms_per_image", "images_per_s", "host_peak_rss_mb"])


if __name__ == "__main__":
  main()
