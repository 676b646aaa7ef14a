"""Overfit check: the tiny config trained on 8 images drives the loss down steadily.

  python benchmarks/overfit.py                       # coco128 (../shared/data) and synthetic
  python benchmarks/overfit.py --sets synthetic --steps 300
  python benchmarks/overfit.py --dtype bfloat16 --matcher device

Each set: the first 8 images that have boxes, batch 4 at 128 px, the trainer of train.py with
no flip, and a constant learning rate after a short warmup. Prints the loss curve (mean over
windows of steps) and writes it with the machine to benchmarks/results/overfit_PLATFORM.json.
"""
import argparse
import json
import pathlib
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import common  # pylint: disable=g-import-not-at-top
from configs import tiny
from sparse_rcnn_jax import experiment
from sparse_rcnn_jax.data import layout
from sparse_rcnn_jax.data import synthetic
from sparse_rcnn_jax.training import metrics_file

COCO128 = common.SHARED / "data" / "coco128"


def first_images_with_boxes(annotations: pathlib.Path, count: int, out: pathlib.Path
                            ) -> pathlib.Path:
  """A COCO json holding the first `count` images (by id) that have non-crowd boxes."""
  coco = json.loads(annotations.read_text())
  with_boxes = {a["image_id"] for a in coco["annotations"] if not a.get("iscrowd", 0)}
  keep = set(sorted(with_boxes)[:count])
  if len(keep) < count:
    raise ValueError(f"{annotations} has only {len(keep)} images with boxes")
  coco["images"] = [im for im in coco["images"] if im["id"] in keep]
  coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
  out.write_text(json.dumps(coco))
  return out


def dataset(name: str, scratch: pathlib.Path, count: int) -> tuple[pathlib.Path, pathlib.Path]:
  """(annotation json, image folder) of `count` images of the named set."""
  if name == "coco128":
    if not COCO128.exists():
      raise FileNotFoundError(f"{COCO128} not found (set SPARSE_RCNN_SHARED)")
    ann = COCO128 / "annotations" / "instances_train2017.json"
    return first_images_with_boxes(ann, count, scratch / "coco128.json"), COCO128 / "train2017"
  root = synthetic.generate(scratch / "synthetic", num_train=32, num_val=1, image_size=128,
                            seed=0)
  ann, images = layout.split_in(str(root), "train")
  return (first_images_with_boxes(pathlib.Path(ann), count, scratch / "synthetic.json"),
          pathlib.Path(images))


def overfit_config(ann: pathlib.Path, images: pathlib.Path, steps: int, batch: int,
                   dtype: str = "float32", matcher: str = "scipy"):
  config = tiny.get_config()
  config.model.dtype = dtype
  config.loss.matcher = matcher
  config.data.update(train_ann=str(ann), train_images=str(images), eval_ann="", eval_images="",
                     train_scales=(128,), max_size=128, test_scale=128, max_boxes=64,
                     batch_size=batch, flip_prob=0.0, on_bad_annotation="skip")
  config.optimizer.update(base_learning_rate=2e-4, base_batch_size=batch, warmup_steps=10,
                          decay_at=())
  config.train.update(num_steps=steps, log_every=1, checkpoint_every=steps)
  return config


def overfit(name: str, steps: int = 200, count: int = 8, batch: int = 4,
            dtype: str = "float32", matcher: str = "scipy") -> np.ndarray:
  """Losses of every step of the tiny config (compute `dtype`, `matcher`) trained on `count`
  images of set `name`."""
  with tempfile.TemporaryDirectory() as scratch:
    scratch = pathlib.Path(scratch)
    ann, images = dataset(name, scratch, count)
    experiment.train(overfit_config(ann, images, steps, batch, dtype, matcher), scratch / "work")
    records = metrics_file.read_metrics(scratch / "work" / "metrics.jsonl")
  return np.array([r["loss"] for r in records if "loss" in r])


def windows(losses: np.ndarray, count: int = 10) -> list[tuple[int, int, float]]:
  """(first step, last step, mean loss) of `count` consecutive windows."""
  edges = np.linspace(0, len(losses), count + 1).astype(int)
  return [(int(a) + 1, int(b), float(losses[a:b].mean())) for a, b in zip(edges, edges[1:])]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sets", nargs="+", default=["coco128", "synthetic"],
                      choices=["coco128", "synthetic"])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
  parser.add_argument("--matcher", default="scipy", choices=["scipy", "device"])
  args = parser.parse_args()
  rows = []
  for name in args.sets:
    for dtype in args.dtype:
      curve = windows(overfit(name, args.steps, dtype=dtype, matcher=args.matcher))
      for first, last, mean in curve:
        rows.append({"set": name, "dtype": dtype, "matcher": args.matcher,
                     "steps": f"{first}-{last}", "mean_loss": mean, "vs_first": mean / curve[0][2]})
  common.report("overfit", rows, ["set", "dtype", "matcher", "steps", "mean_loss", "vs_first"])


if __name__ == "__main__":
  main()
