"""Buckets and padding: fixed shapes, masks, empty slots."""
import numpy as np
import pytest

from sparse_rcnn_jax.data import batching
from sparse_rcnn_jax.data import source as source_lib


def test_default_buckets_hold_every_image_of_the_recipe():
  assert batching.default_buckets(800, 1333, 32) == ((800, 1344), (1344, 800), (1344, 1344))
  assert batching.default_buckets(64, 64, 32) == ((64, 64),)
  rng = np.random.default_rng(0)
  for h, w in zip(rng.integers(1, 801, 100), rng.integers(1, 1334, 100)):
    for hh, ww in ((h, w), (w, h)):
      if min(hh, ww) <= 800:
        bucket = batching.select_bucket(hh, ww, batching.default_buckets(800, 1333, 32))
        assert bucket[0] >= hh and bucket[1] >= ww and bucket[0] % 32 == bucket[1] % 32 == 0


def test_select_bucket_takes_the_smallest_that_fits():
  buckets = [(64, 64), (64, 128), (128, 64), (128, 128)]
  assert batching.select_bucket(60, 30, buckets) == (64, 64)
  assert batching.select_bucket(60, 65, buckets) == (64, 128)
  assert batching.select_bucket(65, 65, buckets) == (128, 128)
  with pytest.raises(ValueError, match="No bucket holds a 129x10"):
    batching.select_bucket(129, 10, buckets)


def _example(h, w, boxes, image_id):
  boxes = np.array(boxes, np.float32).reshape(-1, 4)
  return source_lib.Example(image=np.full((h, w, 3), 7, np.uint8), boxes=boxes,
                            labels=np.arange(1, len(boxes) + 1, dtype=np.int32),
                            image_id=image_id, orig_size=(2 * h, 2 * w))


def test_collate_pads_images_and_ground_truth():
  batch = batching.collate(
      [_example(30, 50, [[1, 2, 3, 4], [5, 6, 7, 8]], 11), None, _example(64, 20, [], 12)],
      bucket=(64, 64), max_boxes=3)
  assert batch["image"].shape == (3, 64, 64, 3) and batch["image"].dtype == np.uint8
  assert (batch["image"][0, :30, :50] == 7).all() and batch["image"][0, 30:].sum() == 0
  assert batch["image"][0, :, 50:].sum() == 0 and batch["image"][1].sum() == 0
  np.testing.assert_array_equal(batch["image_whwh"], [[50, 30, 50, 30], [64, 64, 64, 64],
                                                      [20, 64, 20, 64]])
  np.testing.assert_array_equal(batch["orig_size"], [[60, 100], [64, 64], [128, 40]])
  np.testing.assert_array_equal(batch["image_id"], [11, -1, 12])
  np.testing.assert_array_equal(batch["valid"], [True, False, True])
  np.testing.assert_array_equal(batch["gt_mask"], [[1, 1, 0], [0, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(batch["gt_boxes"][0], [[1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 0, 0]])
  np.testing.assert_array_equal(batch["gt_labels"][0], [1, 2, 0])
  expected = {"image": np.uint8, "image_whwh": np.float32, "orig_size": np.int32,
              "image_id": np.int64, "gt_boxes": np.float32, "gt_labels": np.int32,
              "gt_mask": bool, "valid": bool}
  assert {k: v.dtype for k, v in batch.items()} == expected


def test_collate_keeps_the_first_max_boxes():
  batch = batching.collate([_example(8, 8, [[0, 0, 1, 1]] * 5, 1)], bucket=(32, 32), max_boxes=2)
  assert batch["gt_mask"].tolist() == [[True, True]]
  assert batch["gt_labels"].tolist() == [[1, 2]]
