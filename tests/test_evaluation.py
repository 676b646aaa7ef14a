"""Tests of COCO evaluation, against pycocotools run directly."""
import contextlib
import copy
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sparse_rcnn_jax.evaluation import coco_eval

STAT_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR@1", "AR@10", "AR@100", "ARs", "ARm",
             "ARl")


def _tiny_gt() -> dict:
  """Three images, non-contiguous category ids 2 and 7, a crowd box and an image without boxes."""
  boxes = [  # image_id, category_id, xywh, iscrowd
      (1, 2, [10, 10, 40, 30], 0), (1, 7, [60, 5, 20, 60], 0), (1, 7, [5, 50, 8, 8], 0),
      (2, 2, [0, 0, 100, 90], 0), (2, 2, [30, 30, 10, 12], 0), (2, 7, [50, 50, 30, 30], 1),
      (3, 7, [20, 20, 50, 40], 0)]
  return {
      "images": [{"id": i, "file_name": f"{i}.jpg", "width": 120, "height": 100}
                 for i in (1, 2, 3, 4)],
      "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b,
                       "area": b[2] * b[3], "iscrowd": crowd}
                      for k, (i, c, b, crowd) in enumerate(boxes)],
      "categories": [{"id": 2, "name": "cat"}, {"id": 7, "name": "dog"}],
  }


def _jittered_detections(gt: dict, seed: int) -> list[dict]:
  """One or two noisy copies of each box, some with the wrong class, plus false positives."""
  rng = np.random.default_rng(seed)
  category_ids = [c["id"] for c in gt["categories"]]
  sizes = {im["id"]: (im["width"], im["height"]) for im in gt["images"]}
  results = []
  for ann in gt["annotations"]:
    x, y, w, h = ann["bbox"]
    for _ in range(rng.integers(1, 3)):
      jitter = rng.normal(0.0, 0.1, 4) * [w, h, w, h]
      category = ann["category_id"] if rng.uniform() < 0.8 else int(rng.choice(category_ids))
      results.append({"image_id": ann["image_id"], "category_id": category,
                      "bbox": [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]),
                               max(1.0, h + jitter[3])],
                      "score": float(rng.uniform())})
  for image_id, (width, height) in sizes.items():
    for _ in range(rng.integers(0, 4)):
      x, y = rng.uniform(0, [width, height])
      results.append({"image_id": image_id, "category_id": int(rng.choice(category_ids)),
                      "bbox": [x, y, rng.uniform(2, width - x + 2), rng.uniform(2, height - y + 2)],
                      "score": float(rng.uniform(0, 0.5))})
  return results


def _pycocotools_stats(gt_path, results, cat_ids=None) -> np.ndarray:
  """The 12 summary numbers of a plain pycocotools run, optionally restricted to some classes."""
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = COCO(str(gt_path))
    coco_dt = coco_gt.loadRes(copy.deepcopy(results))
    evaluator = COCOeval(coco_gt, coco_dt, "bbox")
    if cat_ids is not None:
      evaluator.params.catIds = cat_ids
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return evaluator.stats


def _check_against_pycocotools(gt_path, results, max_classes=None):
  """Summary metrics and per-class AP (of the first `max_classes` classes) equal pycocotools'."""
  metrics = coco_eval.evaluate(gt_path, results)
  np.testing.assert_allclose([metrics[k] for k in STAT_KEYS], _pycocotools_stats(gt_path, results),
                             rtol=0, atol=1e-12)
  gt = json.loads(gt_path.read_text())
  names = {c["id"]: c["name"] for c in gt["categories"]}
  for cat_id in sorted(names)[:max_classes]:
    if any(a["category_id"] == cat_id for a in gt["annotations"]):
      expected = _pycocotools_stats(gt_path, results, cat_ids=[cat_id])[0]
      assert metrics["per_class_AP"][names[cat_id]] == pytest.approx(expected, abs=1e-12)
    else:
      assert metrics["per_class_AP"][names[cat_id]] == -1
  return metrics


def test_tiny_ground_truth_matches_pycocotools(tmp_path):
  gt = _tiny_gt()
  gt_path = tmp_path / "gt.json"
  gt_path.write_text(json.dumps(gt))
  for seed in range(3):
    metrics = _check_against_pycocotools(gt_path, _jittered_detections(gt, seed))
    assert 0 < metrics["AP"] < 1


def _coco_val128(data_dir):
  path = data_dir / "coco_val128" / "instances_val2017_first128.json"
  if not path.exists():
    pytest.skip(f"{path} not found")
  return path


def test_coco_val128_matches_pycocotools(data_dir, tmp_path):
  gt_path = _coco_val128(data_dir)
  gt = json.loads(gt_path.read_text())
  results = _jittered_detections(gt, seed=0)
  metrics = _check_against_pycocotools(gt_path, results, max_classes=6)
  assert 0.2 < metrics["AP"] < 0.8 and metrics["num_images"] == 128
  # The same detections read back from a results file.
  from_file = coco_eval.evaluate(gt_path, coco_eval.write_results(results, tmp_path / "r.json"))
  assert from_file == metrics


def _ground_truth_as_detections(gt: dict) -> list[dict]:
  return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
           "score": 1.0} for a in gt["annotations"] if not a["iscrowd"]]


def _check_scores_one(gt: dict):
  metrics = coco_eval.evaluate(gt, _ground_truth_as_detections(gt))
  for key in ("AP", "AP50", "AP75", "AR@100"):
    assert metrics[key] == 1.0, key
  # pycocotools' IoU of a box with itself can round to 1 - 1e-16.
  for name, ap in metrics["per_class_AP"].items():
    assert ap == -1.0 or ap == pytest.approx(1.0, abs=1e-12), name


def test_ground_truth_as_detections_scores_one():
  _check_scores_one(_tiny_gt())


def test_ground_truth_as_detections_scores_one_on_coco_val128(data_dir):
  _check_scores_one(json.loads(_coco_val128(data_dir).read_text()))


def test_label_remap_round_trip():
  """Category ids -> contiguous labels -> detections_to_coco -> the same boxes and ids."""
  gt = _tiny_gt()
  category_ids = sorted(c["id"] for c in gt["categories"])  # [2, 7]
  per_image = {im["id"]: [a for a in gt["annotations"] if a["image_id"] == im["id"]]
               for im in gt["images"]}
  k = 5  # Padded detections per image.
  image_ids = np.array(sorted(per_image))
  boxes = np.zeros((len(image_ids), k, 4), np.float32)
  labels = np.full((len(image_ids), k), 99)  # Out of range: must be masked out.
  valid = np.zeros((len(image_ids), k), bool)
  for b, image_id in enumerate(image_ids):
    for j, ann in enumerate(per_image[image_id]):
      x, y, w, h = ann["bbox"]
      boxes[b, j] = [x, y, x + w, y + h]
      labels[b, j] = category_ids.index(ann["category_id"])
      valid[b, j] = True
  scores = np.linspace(0.9, 0.1, k)[None].repeat(len(image_ids), 0)
  results = coco_eval.detections_to_coco(image_ids, boxes, scores, labels, valid, category_ids)
  expected = sorted((a["image_id"], a["category_id"], tuple(map(float, a["bbox"])))
                    for a in gt["annotations"])
  assert sorted((r["image_id"], r["category_id"], tuple(r["bbox"])) for r in results) == expected
  assert all(isinstance(r["score"], float) and isinstance(r["image_id"], int) for r in results)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
    coco_eval.detections_to_coco(image_ids, boxes, scores, labels, None, category_ids)


def test_no_detections_gives_zero_without_crash(capsys):
  metrics = coco_eval.evaluate(_tiny_gt(), [])
  assert metrics["AP"] == metrics["AR@100"] == metrics["AP50"] == 0.0
  assert metrics["APl"] == -1  # The tiny set has no large box: undefined, as in pycocotools.
  assert metrics["per_class_AP"] == {"cat": 0.0, "dog": 0.0}
  assert metrics["num_detections"] == 0
  assert capsys.readouterr().out == ""  # pycocotools' progress prints are captured.


def test_images_without_predictions_count_as_misses():
  gt = _tiny_gt()
  only_image_1 = [r for r in _ground_truth_as_detections(gt) if r["image_id"] == 1]
  metrics = coco_eval.evaluate(gt, only_image_1)
  # cat: 1 of 3 boxes found; dog: 2 of 3 non-crowd boxes found.
  assert metrics["AR@100"] == pytest.approx((1 / 3 + 2 / 3) / 2)


def test_max_dets_counts_more_detections_per_image():
  boxes = [[(i % 15) * 20, (i // 15) * 20, 15, 15] for i in range(150)]
  gt = {"images": [{"id": 1, "width": 300, "height": 200, "file_name": "a.jpg"}],
        "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": 225,
                         "iscrowd": 0} for i, b in enumerate(boxes)],
        "categories": [{"id": 1, "name": "dot"}]}
  results = [{"image_id": 1, "category_id": 1, "bbox": b, "score": 1.0 - i / 1000}
             for i, b in enumerate(boxes)]
  default = coco_eval.evaluate(gt, results)
  assert default["AR@100"] == pytest.approx(100 / 150) and "AR@300" not in default
  assert default["AP"] < 0.7
  full = coco_eval.evaluate(gt, results, max_dets=300)
  assert full["AR@300"] == full["AP"] == 1.0 and full["AR@100"] == pytest.approx(100 / 150)
  assert "AR@300" in coco_eval.format_table(full)


def test_user_errors_are_explained():
  gt = _tiny_gt()
  with pytest.raises(ValueError, match="no annotations"):
    coco_eval.evaluate({**gt, "annotations": []}, [])
  with pytest.raises(ValueError, match=r"category ids \[1\]"):
    coco_eval.evaluate(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1}])
  with pytest.raises(ValueError, match=r"e\.g\. \[42\]"):
    coco_eval.evaluate(gt, [{"image_id": 42, "category_id": 2, "bbox": [0, 0, 5, 5], "score": 1}])
  broken = copy.deepcopy(gt)
  del broken["annotations"][2]["area"]
  with pytest.raises(ValueError, match=r"annotation 3 of image 1 lacks \['area'\]"):
    coco_eval.evaluate(broken, [])
  with pytest.raises(ValueError, match="3 class names for 2 categories"):
    coco_eval.evaluate(gt, [], class_names=["a", "b", "c"])


def test_caller_data_is_not_modified():
  gt = _tiny_gt()
  results = _jittered_detections(gt, seed=1)
  gt_before, results_before = copy.deepcopy(gt), copy.deepcopy(results)
  coco_eval.evaluate(gt, results)
  assert gt == gt_before and results == results_before


def test_format_table_and_class_names():
  gt = _tiny_gt()
  metrics = coco_eval.evaluate(gt, _ground_truth_as_detections(gt), class_names=["Felis", "Canis"])
  table = coco_eval.format_table(metrics)
  assert "4 images, 6 detections, at most 100 per image" in table
  assert "Felis 100.0" in table and "Canis 100.0" in table
  lines = table.splitlines()
  header = lines[1].split()
  assert header == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
  assert lines[2].split()[header.index("APl")] == "-"
