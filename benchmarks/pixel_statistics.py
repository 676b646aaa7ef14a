"""Which pixel statistics EfficientNet-Lite's converted ImageNet weights expect: each Lite
classifier's top-1 against torchvision's MobileNetV2 (whose preprocessing is known) on COCO val
photos, under TensorFlow's (x - 127) / 128 and under torchvision's ImageNet mean and std.

  python benchmarks/pixel_statistics.py            # 64 photos of ../shared/data/coco_val128

Two ImageNet classifiers agree far more often than chance; the statistics the weights were
trained with should make them agree more. Needs the weight packages of requirements.txt and
requirements-weights.txt.
"""
import argparse
import pathlib
import sys

import jax
import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import common  # pylint: disable=g-import-not-at-top
from sparse_rcnn_jax.model.backbones.efficientnet_lite import EfficientNetLite
from sparse_rcnn_jax.model.backbones.inverted_residual import Classifier
from sparse_rcnn_jax.model.backbones.mobilenet_v2 import MobileNetV2

STATISTICS = {"tensorflow (x - 127) / 128": ((127.0,) * 3, (128.0,) * 3),
              "torchvision imagenet": (MobileNetV2.pixel_mean, MobileNetV2.pixel_std)}


def center_crops(count: int) -> np.ndarray:
  """[count, 224, 224, 3] float32: short side resized to 256, the central 224 x 224."""
  files = sorted((common.SHARED / "data" / "coco_val128" / "val2017").glob("*.jpg"))[:count]
  crops = []
  for f in files:
    image = Image.open(f).convert("RGB")
    scale = 256 / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)),
                         Image.BILINEAR)
    left, top = (image.width - 224) // 2, (image.height - 224) // 2
    crops.append(np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32))
  return np.stack(crops)


def probabilities(net, images: np.ndarray, mean, std) -> np.ndarray:
  """[N, 1000] ImageNet class probabilities of `net` with its package's weights."""
  variables = net.load_weights("imagenet")

  @jax.jit
  def classify(x):
    features = net.apply({"params": variables["params"],
                          "batch_stats": variables["batch_stats"]}, x)
    return jax.nn.softmax(Classifier(net.spec).apply(variables["classifier"], features[5]))

  return np.asarray(classify((images - np.float32(mean)) / np.float32(std)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--photos", type=int, default=64)
  args = parser.parse_args()
  images = center_crops(args.photos)
  reference = probabilities(MobileNetV2(), images, MobileNetV2.pixel_mean, MobileNetV2.pixel_std)
  top5 = np.argsort(-reference, axis=1)[:, :5]
  rows = []
  for variant in (0, 1, 2):
    for name, (mean, std) in STATISTICS.items():
      top1 = probabilities(EfficientNetLite(variant=variant), images, mean, std).argmax(1)
      rows.append({"backbone": f"efficientnet_lite{variant}", "statistics": name,
                   "photos": len(images),
                   "top1_in_mobilenet_top5": float(np.mean([t in r for t, r in zip(top1, top5)])),
                   "top1_equal": float(np.mean(top1 == reference.argmax(1)))})
  common.report("pixel_statistics", rows, ["backbone", "statistics", "photos",
                                           "top1_in_mobilenet_top5", "top1_equal"])


if __name__ == "__main__":
  main()
