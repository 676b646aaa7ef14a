"""Static shapes for jit: images padded into a few bucket shapes, ground truth to a fixed count.

A batch (one host's share, B = global batch / process count) is a dict of NumPy arrays:
  image:      uint8 [B, H, W, 3] RGB, zero-padded bottom/right; (H, W) one of the buckets.
  image_whwh: float32 [B, 4] (w, h, w, h) of the unpadded resized image.
  orig_size:  int32 [B, 2] (h, w) of the original (decoded, EXIF-oriented) image.
  image_id:   int64 [B] the dataset's image id; -1 for an empty slot.
  gt_boxes:   float32 [B, M, 4] absolute xyxy in resized-image pixels; zeros where masked.
  gt_labels:  int32 [B, M] contiguous labels 0..C-1; 0 where masked.
  gt_mask:    bool [B, M] which of the M = max_boxes slots hold a box.
  valid:      bool [B] False for an empty slot: padding that completes the last eval batch, or
              an image skipped as undecodable. An empty slot has a zero image, no boxes, and
              image_whwh / orig_size equal to the bucket size (so nothing divides by zero).
The loader (pipeline.BatchLoader) adds three keys for the host only, never sent to the devices
(pipeline.HOST_KEYS): skipped (int64 [B], the source index of a slot left empty by an image
that failed to decode, else -1), epoch (int64 [B]) and source_index (int64 [B], the source
index planned for each slot, -1 for padding).

Buckets are (H, W) pairs, multiples of the backbone's `size_divisibility` (its coarsest stride:
32 for every backbone here), which the caller passes. A batch is padded to the smallest-area bucket that holds all its images. `default_buckets` gives, for
images with short side <= S and long side <= L: (S, L) for landscape batches, (L, S) for
portrait batches and (L, L) for mixed ones (the pipeline groups images by orientation, so mixed
batches are rare), i.e. at most three compiled shapes per split.
"""
from typing import Sequence

from absl import logging
import numpy as np

from sparse_rcnn_jax.data import source as source_lib


def round_up(size: int, multiple: int) -> int:
  return -(-int(size) // multiple) * multiple


def default_buckets(max_short: int, max_long: int,
                    size_divisibility: int) -> tuple[tuple[int, int], ...]:
  """Bucket shapes (H, W), multiples of `size_divisibility`, for images with short side <=
  max_short and long side <= max_long."""
  short = round_up(max_short, size_divisibility)
  long = round_up(max(max_long, max_short), size_divisibility)
  return tuple(sorted({(short, long), (long, short), (long, long)}))


def select_bucket(height: int, width: int,
                  buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
  """The smallest-area bucket (H, W) with H >= height and W >= width."""
  fitting = [b for b in buckets if b[0] >= height and b[1] >= width]
  if not fitting:
    raise ValueError(f"No bucket holds a {height}x{width} (h x w) batch; buckets are "
                     f"{list(buckets)}. Add a larger one to config.data.buckets, or leave it "
                     "empty for the default rule.")
  return min(fitting, key=lambda b: (b[0] * b[1], b))


def collate(examples: Sequence[source_lib.Example | None], bucket: tuple[int, int],
            max_boxes: int) -> dict[str, np.ndarray]:
  """Pads resized examples into one batch (module docstring); None gives an empty slot.

  An image with more than max_boxes boxes keeps its first max_boxes, with a warning (sources
  that know their box counts refuse such a max_boxes up front).
  """
  b, (height, width) = len(examples), bucket
  batch = {
      "image": np.zeros((b, height, width, 3), np.uint8),
      "image_whwh": np.tile(np.array([width, height, width, height], np.float32), (b, 1)),
      "orig_size": np.tile(np.array([height, width], np.int32), (b, 1)),
      "image_id": np.full((b,), -1, np.int64),
      "gt_boxes": np.zeros((b, max_boxes, 4), np.float32),
      "gt_labels": np.zeros((b, max_boxes), np.int32),
      "gt_mask": np.zeros((b, max_boxes), bool),
      "valid": np.zeros((b,), bool),
  }
  for i, ex in enumerate(examples):
    if ex is None:
      continue
    h, w = ex.image.shape[:2]
    n = len(ex.boxes)
    if n > max_boxes:
      logging.warning("Image id %d has %d boxes; keeping the first config.data.max_boxes=%d",
                      ex.image_id, n, max_boxes)
      n = max_boxes
    batch["image"][i, :h, :w] = ex.image
    batch["image_whwh"][i] = (w, h, w, h)
    batch["orig_size"][i] = ex.orig_size
    batch["image_id"][i] = ex.image_id
    batch["gt_boxes"][i, :n] = ex.boxes[:n]
    batch["gt_labels"][i, :n] = ex.labels[:n]
    batch["gt_mask"][i, :n] = True
    batch["valid"][i] = True
  return batch
