"""COCO-format folders: validation, label mapping, crowd handling and every bad-input case."""
import json
import pathlib

import numpy as np
from PIL import Image
import pytest

from sparse_rcnn_jax.data import coco
from sparse_rcnn_jax.data import source as source_lib


def make_coco_folder(root: pathlib.Path, sizes=((48, 64), (64, 48), (40, 40)), annotations=None,
                     categories=((3, "cat"), (7, "dog"), (12, "bird"))):
  """Writes images (h, w) 0..n-1 as JPEGs with a COCO json; returns (json path, image dir).

  Default annotations: image 1 has a cat and a crowd dog, image 2 a bird and a cat, image 3 none.
  Each image is a flat colour with every well-formed box drawn as a white rectangle.
  """
  image_dir = root / "images"
  image_dir.mkdir(parents=True, exist_ok=True)
  if annotations is None:
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 3, "bbox": [4, 6, 20, 12], "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 7, "bbox": [30, 20, 10, 10], "iscrowd": 1},
        {"id": 12, "image_id": 2, "category_id": 12, "bbox": [2, 30, 30, 20.5], "iscrowd": 0},
        {"id": 13, "image_id": 2, "category_id": 3, "bbox": [10, 2, 8, 8], "area": 50.0},
    ]
  images = []
  for k, (h, w) in enumerate(sizes):
    image_id = k + 1
    pixels = np.full((h, w, 3), (10 * k % 100, 80, 120), np.uint8)
    for ann in annotations:
      box = np.asarray(ann.get("bbox", []) if isinstance(ann, dict) else [], np.float64)
      if (isinstance(ann, dict) and ann.get("image_id") == image_id and box.shape == (4,)
          and np.isfinite(box).all()):
        x, y, bw, bh = np.round(box).astype(int)
        pixels[max(y, 0):y + bh, max(x, 0):x + bw] = 255
    Image.fromarray(pixels).save(image_dir / f"{image_id:04d}.jpg", quality=95)
    images.append({"id": image_id, "file_name": f"{image_id:04d}.jpg", "height": h, "width": w})
  data = {"images": images, "annotations": annotations,
          "categories": [{"id": i, "name": n} for i, n in categories]}
  ann_path = root / "instances.json"
  ann_path.write_text(json.dumps(data))
  return str(ann_path), str(image_dir)


def _rewrite(ann_path: str, edit) -> None:
  data = json.loads(pathlib.Path(ann_path).read_text())
  edit(data)
  pathlib.Path(ann_path).write_text(json.dumps(data))


def test_labels_are_sorted_category_ids_and_crowd_is_kept_only_for_evaluation(tmp_path):
  source = coco.CocoSource(*make_coco_folder(tmp_path))
  assert source.class_names == ("cat", "dog", "bird")
  assert source.category_ids == (3, 7, 12)
  assert len(source) == 3 and source.num_boxes.tolist() == [1, 2, 0]
  first = source.example(0)
  np.testing.assert_allclose(first.boxes, [[4, 6, 24, 18]])  # xywh -> xyxy, crowd dog dropped
  assert first.labels.tolist() == [0] and first.image_id == 1 and first.orig_size == (48, 64)
  second = source.example(1)
  np.testing.assert_allclose(second.boxes, [[2, 30, 32, 50.5], [10, 2, 18, 10]])
  assert second.labels.tolist() == [2, 0]
  empty = source.example(2)
  assert empty.boxes.shape == (0, 4) and empty.labels.shape == (0,)
  assert empty.image.shape == (40, 40, 3)
  gt = source.coco_gt()
  anns = sorted(gt["annotations"], key=lambda a: (a["image_id"], a["category_id"]))
  assert [(a["image_id"], a["category_id"], a["iscrowd"]) for a in anns] == [
      (1, 3, 0), (1, 7, 1), (2, 3, 0), (2, 12, 0)]
  np.testing.assert_allclose(anns[1]["bbox"], [30, 20, 10, 10])
  assert anns[2]["area"] == 50.0 and anns[3]["area"] == pytest.approx(30 * 20.5)
  assert len({a["id"] for a in anns}) == 4
  assert {(i["id"], i["height"], i["width"]) for i in gt["images"]} == {
      (1, 48, 64), (2, 64, 48), (3, 40, 40)}


def test_missing_sizes_come_from_the_header_and_small_overshoots_are_clipped(tmp_path):
  ann_path, image_dir = make_coco_folder(tmp_path, annotations=[
      {"id": 1, "image_id": 1, "category_id": 3, "bbox": [-0.5, 40, 64.8, 8.9]}])

  def drop_sizes(data):
    del data["images"][0]["height"], data["images"][0]["width"]
  _rewrite(ann_path, drop_sizes)
  source = coco.CocoSource(ann_path, image_dir)
  assert source.image_sizes[0].tolist() == [48, 64]
  np.testing.assert_allclose(source.example(0).boxes, [[0, 40, 64, 48]])


BAD_ANNOTATIONS = {
    "unknown image": {"id": 99, "image_id": 42, "category_id": 3, "bbox": [1, 1, 5, 5]},
    "unknown category": {"id": 99, "image_id": 1, "category_id": 4, "bbox": [1, 1, 5, 5]},
    "zero width": {"id": 99, "image_id": 1, "category_id": 3, "bbox": [1, 1, 0, 5]},
    "negative height": {"id": 99, "image_id": 1, "category_id": 3, "bbox": [1, 10, 5, -3]},
    "nan": {"id": 99, "image_id": 1, "category_id": 3, "bbox": [1, float("nan"), 5, 5]},
    "outside image": {"id": 99, "image_id": 1, "category_id": 3, "bbox": [50, 10, 30, 5]},
    "entirely outside": {"id": 99, "image_id": 1, "category_id": 3, "bbox": [70, 10, 5, 5]},
    "malformed bbox": {"id": 99, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5]},
}


@pytest.mark.parametrize("case", sorted(BAD_ANNOTATIONS))
def test_bad_annotations_fail_naming_the_annotation_or_are_skipped(tmp_path, case):
  good = {"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 6, 20, 12]}
  ann_path, image_dir = make_coco_folder(tmp_path, annotations=[good, BAD_ANNOTATIONS[case]])
  with pytest.raises(source_lib.DataError,
                     match=r"(?s)1 of the 2 annotations of .*instances\.json are bad:.*"
                     r"annotation 99 .*on_bad_annotation='skip'"):
    coco.CocoSource(ann_path, image_dir)
  source = coco.CocoSource(ann_path, image_dir, on_bad_annotation="skip")
  if case == "outside image":  # Crosses the border: clipped to the 64 x 48 image, and counted.
    assert source.table.num_clipped == 1
    np.testing.assert_allclose(source.example(0).boxes, [[4, 6, 24, 18], [50, 10, 64, 15]])
    return
  assert len(source.coco_gt()["annotations"]) == 1
  np.testing.assert_allclose(source.example(0).boxes, [[4, 6, 24, 18]])


@pytest.mark.parametrize("content,message", [
    ("", "is empty"),
    ("{\"images\": [", "is not valid JSON"),
    ("[1, 2]", "holds a JSON list"),
    ("{\"categories\": [{\"id\": 1}]}", "has no 'images' list"),
    ("{\"images\": [], \"categories\": [{\"id\": 1}]}", "has no images"),
    ("{\"images\": [{\"id\": 1, \"file_name\": \"a.jpg\"}], \"categories\": []}",
     "has no categories"),
    ("{\"images\": [{\"id\": 1, \"file_name\": \"a.jpg\"}, {\"id\": 1, \"file_name\": \"b.jpg\"}],"
     " \"categories\": [{\"id\": 1}]}", "image id 1 appears twice"),
    ("{\"images\": [{\"file_name\": \"a.jpg\"}], \"categories\": [{\"id\": 1}]}",
     r"images\[0\] needs an integer 'id'"),
])
def test_unusable_json_files_fail_naming_the_file(tmp_path, content, message):
  ann_path = tmp_path / "broken.json"
  ann_path.write_text(content)
  with pytest.raises(ValueError, match=message) as error:
    coco.read_coco(str(ann_path), str(tmp_path))
  assert "broken.json" in str(error.value)


def test_missing_annotation_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.json"):
    coco.read_coco(str(tmp_path / "nowhere.json"), str(tmp_path))


def test_missing_image_files_are_skipped_with_their_boxes_or_fail_by_policy(tmp_path):
  ann_path, image_dir = make_coco_folder(tmp_path)
  (pathlib.Path(image_dir) / "0001.jpg").unlink()
  with pytest.raises(source_lib.DataError,
                     match=r"(?s)1 of the 3 images .*1 x missing file.*0001\.jpg.*does not exist"):
    coco.CocoSource(ann_path, image_dir, on_bad_image="error")
  source = coco.CocoSource(ann_path, image_dir)
  assert source.table.image_ids.tolist() == [2, 3]
  assert {a["image_id"] for a in source.coco_gt()["annotations"]} == {2}
  for name in ("0002.jpg", "0003.jpg"):
    (pathlib.Path(image_dir) / name).unlink()
  with pytest.raises(ValueError, match="none of its 3 images"):
    coco.CocoSource(ann_path, image_dir)


def test_policy_names_are_checked(tmp_path):
  with pytest.raises(ValueError, match="on_bad_image must be one of"):
    coco.CocoSource(*make_coco_folder(tmp_path), on_bad_image="ignore")


def test_coco128_schema(data_dir):
  """Real COCO json: id gaps, crowd boxes, a greyscale image, images without boxes."""
  root = data_dir / "coco128"
  ann_path = root / "annotations" / "instances_train2017.json"
  source = coco.CocoSource(str(ann_path), str(root / "train2017"))
  raw = json.loads(ann_path.read_text())
  ids = sorted(c["id"] for c in raw["categories"])
  assert source.category_ids == tuple(ids) and source.num_classes == 80
  assert ids[-1] == 90  # Gaps: 80 classes numbered up to 90.
  crowd = sum(a["iscrowd"] for a in raw["annotations"])
  assert crowd == 10
  assert len(source) == 128 and source.num_boxes.sum() == len(raw["annotations"]) - crowd
  with_boxes = {a["image_id"] for a in raw["annotations"]}
  assert sum(i["id"] not in with_boxes for i in raw["images"]) == 2
  assert sorted(np.asarray(source.table.image_ids)[source.num_boxes == 0].tolist()) == sorted(
      i["id"] for i in raw["images"]
      if all(a["iscrowd"] for a in raw["annotations"] if a["image_id"] == i["id"]))
  grey = [k for k, i in enumerate(raw["images"])
          if Image.open(root / "train2017" / i["file_name"]).mode == "L"]
  assert len(grey) == 1
  example = source.example(grey[0])
  assert example.image.shape == (raw["images"][grey[0]]["height"],
                                 raw["images"][grey[0]]["width"], 3)
  assert (example.image[..., 0] == example.image[..., 2]).all()


def test_coco128_ground_truth_scores_perfect_detections_as_ap_1(data_dir):
  """The GT dict works with pycocotools: its own non-crowd boxes as detections give AP 1."""
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  root = data_dir / "coco128"
  source = coco.CocoSource(str(root / "annotations" / "instances_train2017.json"),
                           str(root / "train2017"))
  gt = COCO()
  gt.dataset = source.coco_gt()
  gt.createIndex()
  detections = []
  for i in range(len(source)):
    rows = slice(source.table.box_start[i], source.table.box_start[i + 1])
    for box, label, crowd in zip(source.table.boxes[rows], source.table.labels[rows],
                                 source.table.is_crowd[rows]):
      if not crowd:
        detections.append({"image_id": int(source.table.image_ids[i]),
                           "category_id": source.category_ids[label],
                           "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                           "score": 1.0})
  evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
  evaluator.evaluate()
  evaluator.accumulate()
  evaluator.summarize()
  assert evaluator.stats[0] == pytest.approx(1.0)


def test_bccd(data_dir):
  root = data_dir / "bccd"
  source = coco.CocoSource(str(root / "instances_trainval.json"), str(root / "JPEGImages"))
  assert source.class_names == ("RBC", "WBC", "Platelets")
  assert len(source) == 292 and source.num_boxes.sum() == 3941
  assert (source.image_sizes == [480, 640]).all()
  example = source.example(0)
  assert example.image.shape == (480, 640, 3) and len(example.boxes) == source.num_boxes[0]
