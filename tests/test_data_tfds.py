"""TFDS: a COCO folder built into array_record reads back as the same examples and ground truth."""
import pickle
import shutil

import numpy as np
import pytest

from sparse_rcnn_jax.data import coco
from sparse_rcnn_jax.data import config as data_config
from sparse_rcnn_jax.data import pipeline
from sparse_rcnn_jax.data import tfds as tfds_lib
from test_data_coco import make_coco_folder  # pylint: disable=g-bad-import-order


@pytest.fixture(name="built", scope="module")
def fixture_built(tmp_path_factory):
  """A folder with id gaps, a crowd box and an image without boxes, built for splits a and b."""
  root = tmp_path_factory.mktemp("coco")
  ann_path, image_dir = make_coco_folder(root)
  data_dir = tmp_path_factory.mktemp("tfds")
  path = tfds_lib.build_coco_folder("tiny", {"a": (ann_path, image_dir),
                                             "b": (ann_path, image_dir)}, str(data_dir))
  return ann_path, image_dir, str(data_dir), path


def test_built_dataset_reads_back_like_the_folder(built):
  ann_path, image_dir, data_dir, path = built
  assert path.endswith("coco_folder/tiny/1.0.0")
  folder = coco.CocoSource(ann_path, image_dir)
  source = tfds_lib.TfdsSource("coco_folder/tiny", "b", data_dir=data_dir)
  assert len(source) == len(folder) == 3
  assert source.class_names == folder.class_names
  assert source.category_ids == folder.category_ids == (3, 7, 12)
  np.testing.assert_array_equal(source.image_sizes, folder.image_sizes)
  for i in range(3):
    expected, got = folder.example(i), source.example(i)
    assert got.image_id == expected.image_id and got.orig_size == expected.orig_size
    np.testing.assert_array_equal(got.image, expected.image)  # The same bytes, decoded alike.
    np.testing.assert_allclose(got.boxes, expected.boxes, atol=1e-4)
    np.testing.assert_array_equal(got.labels, expected.labels)
  expected_gt, gt = folder.coco_gt(), source.coco_gt()
  assert gt["categories"] == expected_gt["categories"]
  assert gt["images"] == expected_gt["images"]
  for a, b in zip(gt["annotations"], expected_gt["annotations"]):
    np.testing.assert_allclose(a.pop("bbox"), b.pop("bbox"), atol=1e-4)
    assert a == b
  assert len(gt["annotations"]) == 4 and sum(a["iscrowd"] for a in gt["annotations"]) == 1
  copy = pickle.loads(pickle.dumps(source))  # Grain sends sources to worker processes.
  np.testing.assert_array_equal(copy.example(1).boxes, source.example(1).boxes)


def test_pipeline_reads_a_tfds_source(built):
  _, _, data_dir, _ = built
  config = data_config.default_config()
  config.update({"source": "tfds", "tfds_name": "coco_folder/tiny", "tfds_data_dir": data_dir,
                 "train_split": "a", "eval_split": "b", "train_scales": (32,), "max_size": 64,
                 "test_scale": 32, "batch_size": 2, "eval_batch_size": 2, "num_workers": 0})
  train = pipeline.load_source(config, "train")
  assert isinstance(train, tfds_lib.TfdsSource) and train.split == "a"
  batch = next(pipeline.train_iterator(config, train, size_divisibility=32))
  assert batch["image"].shape[0] == 2 and batch["valid"].all()
  batches = list(pipeline.eval_iterator(config, pipeline.load_source(config, "eval"), size_divisibility=32))
  ids = np.concatenate([b["image_id"] for b in batches])
  assert sorted(ids.tolist()) == [-1, 1, 2, 3]


def test_datasets_without_recorded_metadata_still_work(built, tmp_path):
  """Like TFDS's own coco/2017: no category ids, no sizes; sizes come from image headers."""
  _, _, data_dir, path = built
  copy = tmp_path / "coco_folder" / "tiny" / "1.0.0"
  shutil.copytree(path, copy)
  (copy / "metadata.json").unlink()
  source = tfds_lib.TfdsSource("coco_folder/tiny", "a", data_dir=str(tmp_path))
  assert source.category_ids == (1, 2, 3) and source.image_sizes is None
  gt = source.coco_gt()
  assert {(i["id"], i["height"], i["width"]) for i in gt["images"]} == {
      (1, 48, 64), (2, 64, 48), (3, 40, 40)}
  config = data_config.default_config()
  config.update({"train_scales": (32,), "max_size": 64, "batch_size": 3, "num_workers": 0})
  batch = next(pipeline.train_iterator(config, source, size_divisibility=32))
  assert batch["image"].shape[1:3] == (64, 64)  # Mixed orientations, no grouping without sizes.
