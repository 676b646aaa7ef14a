"""Test-time augmentation against independent references: the soft-vote merge against a literal
NumPy transcription of the official loop (boxes of all classes shifted apart, one loop over all
of them); the scale filter, the mapping back to the original image and the mirroring against
NumPy; the device function against the model run on NumPy-mirrored images; and a whole TTA
evaluation of a tiny model on a small COCO folder at two scales."""
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from configs import tiny
from sparse_rcnn_jax import device_batches
from sparse_rcnn_jax import sharding
from sparse_rcnn_jax.data import pipeline
from sparse_rcnn_jax.evaluation import tta
from sparse_rcnn_jax.model import detector

VOTE_IOU = 0.65
IMAGE_HW = (300, 400)


# The official merge, step by step as its code does it (float64 here).

def _official_soft_dets_sum(vote_det, vote_det_iou):
  soft_vote_det = vote_det.copy()
  soft_vote_det[:, 4] *= 1 - vote_det_iou
  soft_vote_det = soft_vote_det[np.where(soft_vote_det[:, 4] >= 0.05)[0], :]
  vote_det = vote_det.copy()
  vote_det[:, :4] *= np.repeat(vote_det[:, 4:5], 4, axis=1)
  det_accu_sum = np.zeros((1, 6))
  det_accu_sum[:, :4] = vote_det[:, :4].sum(axis=0) / vote_det[:, 4].sum()
  det_accu_sum[:, 4] = vote_det[:, 4].max()
  det_accu_sum[:, 5] = vote_det[0, 5]
  if soft_vote_det.shape[0] > 0:
    det_accu_sum = np.concatenate([det_accu_sum, soft_vote_det])
  return det_accu_sum


def _official_bbox_vote(boxes, scores, labels, vote_thresh):
  det = np.concatenate([boxes, scores[:, None], labels[:, None]], axis=1)
  vote_results = np.zeros((0, 6))
  if det.size == 0:
    return vote_results[:, :4], vote_results[:, 4], vote_results[:, 5]
  det = det[np.argsort(-scores, kind="stable")]
  while det.shape[0] > 0:
    area = (det[:, 2] - det[:, 0]) * (det[:, 3] - det[:, 1])
    xx1 = np.maximum(det[0, 0], det[:, 0])
    yy1 = np.maximum(det[0, 1], det[:, 1])
    xx2 = np.minimum(det[0, 2], det[:, 2])
    yy2 = np.minimum(det[0, 3], det[:, 3])
    inter = np.maximum(xx2 - xx1, 0.0) * np.maximum(yy2 - yy1, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
      iou = inter / (area[0] + area - inter)
      merge_index = np.where(iou >= vote_thresh)[0]
      vote_det = det[merge_index, :]
      det = det[iou < vote_thresh]
    if merge_index.shape[0] <= 1:
      vote_results = np.concatenate([vote_results, vote_det])
    else:
      vote_results = np.concatenate(
          [vote_results, _official_soft_dets_sum(vote_det, iou[merge_index])])
  vote_results = vote_results[np.argsort(-vote_results[:, 4], kind="stable")]
  return vote_results[:, :4], vote_results[:, 4], vote_results[:, 5]


def _official_merge(boxes, scores, labels, image_hw, vote_thresh, max_detection):
  labels = labels.astype(np.float64)
  max_coordinates = boxes.max() + 1 if boxes.size else 1.0
  boxes = boxes + labels[:, None] * max_coordinates
  boxes, scores, labels = _official_bbox_vote(boxes, scores, labels, vote_thresh)
  boxes = boxes - labels[:, None] * max_coordinates
  if boxes.shape[0] > max_detection > 0:
    boxes, scores, labels = boxes[:max_detection], scores[:max_detection], labels[:max_detection]
  height, width = image_hw
  boxes = np.stack([np.clip(boxes[:, 0], 0, width), np.clip(boxes[:, 1], 0, height),
                    np.clip(boxes[:, 2], 0, width), np.clip(boxes[:, 3], 0, height)], axis=1)
  return boxes, scores, labels.astype(np.int64)


def _fixed_detections():
  """Clusters of 2-4 with IoUs just above and below 0.65 and soft scores just above and below
  0.05; another class on the same objects; a lone box; boxes without area; boxes across the
  border (past the top-left only in class 0, where the official shift still separates
  classes); a score tied across classes."""
  rows = [
      # class 0, one object: IoU 0.82 (soft 0.2 * 0.18 = 0.036, dropped), 0.667 (soft 0.16 *
      # 0.333 = 0.053, kept), 0.639 (its own cluster), 0.89.
      ([100, 100, 200, 200], 0.90, 0), ([110, 100, 210, 200], 0.20, 0),
      ([120, 100, 220, 200], 0.16, 0), ([122, 100, 222, 200], 0.50, 0),
      ([105, 102, 203, 198], 0.30, 0),
      # class 0 across the top-left and the bottom-right border.
      ([-30, -10, 50, 60], 0.70, 0), ([-28, -12, 52, 58], 0.12, 0),
      ([350, 250, 420, 320], 0.60, 0), ([352, 248, 418, 322], 0.48, 0),
      ([355, 255, 425, 318], 0.23, 0),
      # class 0 without area, the highest score (a NaN IoU in the official loop).
      ([10, 10, 10, 50], 0.95, 0),
      # class 1 on class 0's object: merges only within class 1.
      ([100, 100, 200, 200], 0.85, 1), ([101, 99, 199, 201], 0.20, 1),
      ([130, 110, 230, 210], 0.40, 1), ([118, 100, 218, 200], 0.165, 1),
      # class 2: alone, a tie with class 0's 0.60, a box without area.
      ([300, 50, 380, 120], 0.05, 2), ([20, 200, 90, 280], 0.60, 2), ([50, 50, 90, 50], 0.3, 2),
  ]
  boxes = np.array([r[0] for r in rows], np.float64)
  return boxes, np.array([r[1] for r in rows]), np.array([r[2] for r in rows])


def _random_detections(seed):
  """60 boxes around 8 objects (sizes and shifts varied so IoUs spread around 0.65), mostly of
  the object's class, some of another; inside the image or past its bottom-right border."""
  rng = np.random.default_rng(seed)
  centers = rng.uniform([40, 40], [420, 320], (8, 2))
  sizes = rng.uniform(20, 120, (8, 2))
  obj = rng.integers(0, 8, 60)
  jitter = rng.normal(0, 0.12, (60, 4)) * np.tile(sizes[obj], 2)
  boxes = np.concatenate([centers[obj] - sizes[obj] / 2, centers[obj] + sizes[obj] / 2], 1)
  boxes = np.maximum(boxes + jitter, 0.0)
  boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1.0)
  labels = np.where(rng.random(60) < 0.8, obj % 3, rng.integers(0, 3, 60))
  return boxes, rng.uniform(0.01, 1.0, 60), labels


def _assert_same(got, want):
  assert got[0].shape == want[0].shape and got[1].shape == want[1].shape
  np.testing.assert_array_equal(got[2], want[2])
  np.testing.assert_allclose(got[1], want[1], rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-9)


@pytest.mark.parametrize("max_detections", [0, 100, 5])
def test_merge_fixed_detections_as_the_official_loop(max_detections):
  boxes, scores, labels = _fixed_detections()
  got = tta.merge_detections(boxes, scores, labels, IMAGE_HW, VOTE_IOU, max_detections)
  want = _official_merge(boxes, scores, labels, IMAGE_HW, VOTE_IOU, max_detections)
  _assert_same(got, want)
  if max_detections == 5:
    assert len(got[1]) == 5
  else:
    # 4 merged clusters, 3 soft members kept (scores 0.0533, 0.0506, 0.0503; 4 dropped at
    # 0.036, 0.034, 0.049, ...), 4 lone boxes; neither box without area survives.
    assert len(got[1]) == 11
  assert np.all(np.diff(got[1]) <= 0)
  assert got[0].min() >= 0 and np.all(got[0][:, [0, 2]] <= IMAGE_HW[1])
  assert np.all(got[0][:, [1, 3]] <= IMAGE_HW[0])


@pytest.mark.parametrize("seed", range(6))
def test_merge_random_clusters_as_the_official_loop(seed):
  boxes, scores, labels = _random_detections(seed)
  got = tta.merge_detections(boxes, scores, labels, IMAGE_HW, VOTE_IOU, 30)
  _assert_same(got, _official_merge(boxes, scores, labels, IMAGE_HW, VOTE_IOU, 30))


def test_merge_hand_computed_cluster_and_classes_apart():
  boxes = np.array([[0, 0, 10, 10], [2, 0, 12, 10], [0, 0, 10, 10]], np.float64)
  scores = np.array([0.8, 0.4, 0.7])
  boxes_out, scores_out, labels_out = tta.merge_detections(boxes, scores, [0, 0, 1], (50, 50))
  # Class 0: IoU 80 / 120 = 2/3 -> one box, the score-weighted mean, plus the member again with
  # 0.4 * (1 - 2/3) = 0.133. Class 1 is on the same spot and stays apart.
  np.testing.assert_allclose(scores_out, [0.8, 0.7, 0.4 / 3])
  np.testing.assert_array_equal(labels_out, [0, 1, 0])
  np.testing.assert_allclose(boxes_out, [[0.8 / 1.2, 0, 10 + 0.8 / 1.2, 10], [0, 0, 10, 10],
                                         [2, 0, 12, 10]])


def test_merge_of_one_box_none_and_boxes_without_area():
  one = tta.merge_detections([[-5, 10, 500, 40]], [0.3], [4], IMAGE_HW)
  np.testing.assert_array_equal(one[0], [[0, 10, 400, 40]])
  assert one[1].tolist() == [0.3] and one[2].tolist() == [4]
  for boxes, scores in (([], []), ([[5, 5, 5, 9], [1, 2, 3, 2]], [0.9, 0.8])):
    out = tta.merge_detections(np.reshape(boxes, (-1, 4)), scores, np.zeros(len(scores)),
                               IMAGE_HW)
    assert out[0].shape == (0, 4) and out[1].shape == (0,) and out[2].shape == (0,)


def test_scale_filter_keeps_areas_strictly_between_the_squares():
  boxes = np.array([[[0, 0, 10, 10], [0, 0, 11, 10], [5, 5, 25, 25], [0, 0, 19, 21]],
                    [[0, 0, 3, 3], [0, 0, 4, 4.5], [1, 1, 41, 41], [0, 0, 0, 30]]], np.float32)
  ranges = np.array([[10, 20], [4, 40]], np.float32)
  want = np.zeros(boxes.shape[:2], bool)
  for b in range(2):
    low, high = ranges[b]
    for j in range(4):
      area = (boxes[b, j, 2] - boxes[b, j, 0]) * (boxes[b, j, 3] - boxes[b, j, 1])
      want[b, j] = low ** 2 < area < high ** 2
  assert want.tolist() == [[False, True, False, True], [False, True, False, False]]
  np.testing.assert_array_equal(tta.scale_filter(boxes, ranges[:, None, :]), want)
  np.testing.assert_array_equal(
      np.asarray(tta.scale_filter(jnp.asarray(boxes), jnp.asarray(ranges)[:, None, :])), want)


@pytest.mark.parametrize("mirrored", [False, True])
def test_boxes_back_to_the_original_image(mirrored):
  boxes = np.array([[[1, 2, 30, 20], [-4, 5, 70, 45], [55, 0, 60, 3]],
                    [[0, 0, 50, 70], [10, 20, 11, 21], [40, 60, 49, 69]]], np.float32)
  whwh = np.array([[60, 40, 60, 40], [50, 70, 50, 70]], np.float32)
  orig_size = np.array([[80, 120], [100, 71]], np.int32)   # (h, w)
  want = np.zeros_like(boxes)
  for b in range(2):
    width, height = whwh[b, :2]
    for j in range(3):
      x1, y1, x2, y2 = boxes[b, j]
      if mirrored:
        x1, x2 = width - x2, width - x1
      sx, sy = orig_size[b, 1] / width, orig_size[b, 0] / height
      want[b, j] = [x1 * sx, y1 * sy, x2 * sx, y2 * sy]
  got = tta.to_original(jnp.asarray(boxes), jnp.asarray(whwh), jnp.asarray(orig_size), mirrored)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-4)


def test_flip_mirrors_each_image_within_its_width():
  rng = np.random.default_rng(0)
  images = np.zeros((3, 6, 8, 3), np.uint8)
  sizes = [(6, 8), (4, 5), (5, 1)]   # (h, w)
  for b, (h, w) in enumerate(sizes):
    images[b, :h, :w] = rng.integers(1, 256, (h, w, 3))
  want = np.zeros_like(images)
  for b, (h, w) in enumerate(sizes):
    want[b, :h, :w] = images[b, :h, :w][:, ::-1]
  widths = jnp.asarray([w for _, w in sizes], jnp.int32)
  got = np.asarray(jax.jit(tta.flip_images)(jnp.asarray(images), widths))
  np.testing.assert_array_equal(got, want)


def test_settings_from_config_and_errors():
  config = ml_collections.ConfigDict({"model": {"num_proposals": 7}, "tta": dict(
      min_sizes=(10, 20), max_size=50, flip=False, scale_ranges=(), vote_iou=0.6,
      max_detections=None)})
  settings = tta.TtaSettings.from_config(config)
  assert settings.max_detections == 7 and settings.scale_ranges == ((0, np.inf),) * 2
  config.tta.scale_ranges = ((0, 10),)
  with pytest.raises(ValueError, match="1 \\(lo, hi\\) pairs for 2"):
    tta.TtaSettings.from_config(config)
  with pytest.raises(ValueError, match="no `tta` section"):
    tta.TtaSettings.from_config(ml_collections.ConfigDict({"model": {"num_proposals": 7}}))


# The device function and a whole evaluation share one tiny model and one compiled function:
# the unit batch has the bucket shape (64, 96) that the evaluation's landscape batches use.

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def tiny_model():
  config = tiny.get_config()
  config.model.num_stages = 1
  model = detector.build_model(config.model, NUM_CLASSES)
  rng = np.random.default_rng(0)
  image = jnp.zeros((1, 64, 96, 3), jnp.uint8)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), image, jnp.ones((1, 4)))
  flat = {k: rng.normal(0, 0.2, s.shape).astype(s.dtype)
          for k, s in traverse_util.flatten_dict(shapes).items()}
  num = config.model.num_proposals
  flat[("params", "head", "proposal_boxes")] = np.concatenate(
      [rng.uniform(0.2, 0.8, (num, 2)), rng.uniform(0.1, 0.6, (num, 2))], 1).astype(np.float32)
  variables = jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat))
  mesh = sharding.make_mesh()
  return {"config": config, "model": model, "variables": variables, "mesh": mesh,
          "predict_fn": tta.make_predict_fn(model, mesh, flip=True)}


def test_device_function_equals_the_model_on_mirrored_images(tiny_model):
  model, variables = tiny_model["model"], tiny_model["variables"]
  rng = np.random.default_rng(1)
  sizes = [(64, 85), (48, 64)]   # (h, w) of each resized image in the (64, 96) bucket
  images = np.zeros((2, 64, 96, 3), np.uint8)
  mirrored = np.zeros_like(images)
  for b, (h, w) in enumerate(sizes):
    images[b, :h, :w] = rng.integers(0, 256, (h, w, 3))
    mirrored[b, :h, :w] = images[b, :h, :w][:, ::-1]
  batch = {"image": images,
           "image_whwh": np.array([[w, h, w, h] for h, w in sizes], np.float32),
           "orig_size": np.array([[480, 640], [300, 400]], np.int32),
           "image_id": np.array([3, 4]), "valid": np.array([True, True]),
           "scale_range": np.array([[20, 10000], [0, 30]], np.float32)}
  got = jax.tree.map(np.asarray, tiny_model["predict_fn"](
      variables, device_batches.make_global_batch(batch, tiny_model["mesh"])))
  apply = jax.jit(model.apply)
  num = tiny_model["config"].model.num_proposals
  for f, pixels in enumerate((images, mirrored)):
    out = jax.tree.map(np.asarray, apply(variables, jnp.asarray(pixels),
                                         jnp.asarray(batch["image_whwh"])))
    for b, (h, w) in enumerate(sizes):
      probs = 1 / (1 + np.exp(-out["pred_logits"][-1, b].astype(np.float64)))
      order = np.argsort(-probs.reshape(-1), kind="stable")[:num]
      boxes = out["pred_boxes"][-1, b][order // NUM_CLASSES].astype(np.float64)
      np.testing.assert_array_equal(got["labels"][b, f], order % NUM_CLASSES)
      np.testing.assert_allclose(got["scores"][b, f], probs.reshape(-1)[order], rtol=1e-5)
      low, high = batch["scale_range"][b]
      area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
      np.testing.assert_array_equal(got["keep"][b, f], (area > low ** 2) & (area < high ** 2))
      if f:
        boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
      scale = np.array([640 / w, 480 / h] * 2) if b == 0 else np.array([400 / w, 300 / h] * 2)
      np.testing.assert_allclose(got["boxes"][b, f], boxes * scale, rtol=1e-4, atol=1e-3)
  assert got["keep"].any() and not got["keep"].all()


SIZES = ((48, 64), (40, 60), (56, 56))   # (h, w); at short sides 48 and 64 all fit (64, 96)


def _coco_folder(root: pathlib.Path) -> tuple[str, str]:
  """Three images (two landscape, one square) with a box or two each, three classes."""
  rng = np.random.default_rng(2)
  images, annotations = [], []
  for i, (h, w) in enumerate(SIZES):
    pixels = np.full((h, w, 3), 30, np.uint8)
    pixels[8:30, 6:28] = rng.integers(100, 256, 3)
    Image.fromarray(pixels).save(root / f"{i}.png")
    images.append({"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w})
    for j, box in enumerate([[6, 8, 22, 22], [w / 2, h / 2, w / 3, h / 3]][:1 + i % 2]):
      annotations.append({"id": 10 * i + j, "image_id": i + 1, "category_id": [5, 7, 9][j + i % 2],
                          "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
  categories = [{"id": c, "name": f"class{c}"} for c in (5, 7, 9)]
  ann = root / "instances.json"
  ann.write_text(json.dumps({"images": images, "annotations": annotations,
                             "categories": categories}))
  return str(ann), str(root)


def test_evaluation_at_two_scales_writes_ap(tiny_model, tmp_path):
  config = tiny_model["config"].copy_and_resolve_references()
  ann, folder = _coco_folder(tmp_path)
  config.data.update(source="coco", eval_ann=ann, eval_images=folder, test_scale=64,
                     max_size=96, eval_batch_size=2)
  config.tta = ml_collections.ConfigDict(dict(
      min_sizes=(48, 64), max_size=96, flip=True, scale_ranges=((0, 10000), (12, 10000)),
      vote_iou=0.65, max_detections=6))
  source = pipeline.load_source(config.data, "eval")
  results_path = tmp_path / "detections_tta.json"
  metrics = tta.evaluate_split(tiny_model["predict_fn"], tiny_model["variables"], config,
                               tiny_model["mesh"], source, results_path=results_path,
                               size_divisibility=32)
  assert metrics["num_images"] == 3
  assert all(0.0 <= metrics[k] <= 1.0 or metrics[k] == -1.0 for k in ("AP", "AP50", "AR@100"))
  detections = json.loads(results_path.read_text())
  per_image = np.bincount([d["image_id"] for d in detections])
  assert len(detections) == metrics["num_detections"] and 0 < per_image.max() <= 6
  for d in detections:
    x, y, w, h = d["bbox"]
    assert d["category_id"] in (5, 7, 9) and 0 <= d["score"] <= 1
    assert 0 <= x and x + w <= SIZES[d["image_id"] - 1][1] + 0.01
    assert 0 <= y and y + h <= SIZES[d["image_id"] - 1][0] + 0.01
  # Every batch of both scales fits the (64, 96) bucket: one program for the whole file.
  assert tiny_model["predict_fn"]._cache_size() == 1
