"""A compile budget: over a short main-job-like run (training over every bucket shape, two
evaluations during training, the final one and the pictures) each program compiles once per
bucket shape it meets, never again for a shape it has already compiled. The run's config is a
FrozenConfigDict, which raises on any write: nothing writes into a config (test_config_flow.py
checks the source for the same).

JAX logs every compilation with jax_log_compiles ("Compiling jit(NAME) with global shapes and
types ..."); the test reads those records.
"""
import collections
import json
import logging
import pathlib
import re

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from sparse_rcnn_jax import experiment

LANDSCAPE, PORTRAIT = (64, 96), (96, 64)  # (h, w)
COMPILING = re.compile(r"Compiling jit\((?P<name>[^)]*)\) with global shapes and types "
                       r"(?P<shapes>.*?)\. Argument mapping")


def _coco_folder(root: pathlib.Path) -> str:
  """annotations/{train,val}.json and images/: two landscape and two portrait images, one box
  each, so that batches of two grouped by orientation fill both bucket shapes."""
  (root / "images").mkdir(parents=True)
  images, annotations = [], []
  for k, (h, w) in enumerate([LANDSCAPE, PORTRAIT, LANDSCAPE, PORTRAIT]):
    pixels = np.full((h, w, 3), 40 + 30 * k, np.uint8)
    pixels[10:30, 12:40] = 220
    Image.fromarray(pixels).save(root / "images" / f"{k}.jpg", quality=95)
    images.append({"id": k + 1, "file_name": f"{k}.jpg", "height": h, "width": w})
    annotations.append({"id": k + 1, "image_id": k + 1, "category_id": 1,
                        "bbox": [12, 10, 28, 20], "area": 560.0, "iscrowd": 0})
  record = json.dumps({"images": images, "annotations": annotations,
                       "categories": [{"id": 1, "name": "block"}]})
  (root / "annotations").mkdir()
  for split in ("train", "val"):
    (root / "annotations" / f"{split}.json").write_text(record)
  return str(root)


class _Compiles(logging.Handler):
  """Collects (program name, argument shapes) of every compilation JAX logs."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.seen = []

  def emit(self, record):
    match = COMPILING.search(record.getMessage())
    if match:
      self.seen.append((match["name"], match["shapes"]))


def test_each_program_compiles_once_per_bucket_shape(tmp_path, monkeypatch):
  config = tiny.get_config()
  config.model.num_stages = 1
  config.data.update(coco_root=_coco_folder(tmp_path / "data"), train_scales=(64,),
                     max_size=96, test_scale=64, batch_size=2, eval_batch_size=2,
                     flip_prob=0.5, group_by_aspect=True)
  config.train.update(num_steps=4, eval_every=2, log_every=1, checkpoint_every=4)
  handler = _Compiles()
  logger = logging.getLogger("jax._src.interpreters.pxla")
  logger.addHandler(handler)
  monkeypatch.setattr(logger, "level", logging.DEBUG)
  jax.config.update("jax_log_compiles", True)
  try:
    frozen = ml_collections.FrozenConfigDict(config)
    metrics = experiment.train_and_evaluate(frozen, tmp_path / "work")
  finally:
    jax.config.update("jax_log_compiles", False)
    logger.removeHandler(handler)
  assert metrics is not None and metrics["num_images"] == 4
  assert sorted(p.name for p in (tmp_path / "work").glob("detections_*.png")) == [
      "detections_0.png", "detections_0_stages.png", "detections_1.png",
      "detections_1_stages.png"]
  with pytest.raises((AttributeError, TypeError, ValueError)):
    frozen.model.num_classes = 3   # the run could not have written into it either

  # Single primitives run eagerly (jnp.zeros_like in the optimizer's init, ...) are compiled
  # per static argument, which the log line does not show; every program of ours is checked.
  programs = [seen for seen in handler.seen if not hasattr(jax.lax, seen[0])]
  assert {name for name, _ in programs} >= {"train_step", "predict"}
  repeated = [k for k, n in collections.Counter(programs).items() if n > 1]
  assert not repeated, f"compiled again for shapes already compiled: {repeated}"
  per_program = collections.defaultdict(set)
  for name, shapes in handler.seen:
    per_program[name].add(shapes)
  # The train step and the predict function: one program per bucket shape (both orientations).
  buckets = {f"{h},{w},3" for h, w in (LANDSCAPE, PORTRAIT)}
  for name in ("train_step", "predict"):
    images = [re.search(r"uint8\[(\d+,\d+,\d+,3)\]", s)[1].split(",", 1)[1]
              for s in per_program[name]]
    assert sorted(images) == sorted(buckets), (name, per_program[name])
