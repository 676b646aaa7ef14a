"""COCO box evaluation with pycocotools, and the conversion of model outputs to COCO results.

Every image of the ground truth is evaluated, whether or not it has predictions: an image the
model never saw counts as missed detections rather than silently leaving the score.

Metrics are fractions in [0, 1]; -1 marks a metric that is undefined because the ground truth has
no box it could measure (e.g. APs without small objects), as in pycocotools.
"""
import contextlib
import io
import json
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

_REQUIRED_GT_KEYS = ("id", "image_id", "category_id", "bbox", "area", "iscrowd")


def detections_to_coco(image_ids, boxes_xyxy, scores, labels, valid,
                       category_ids: Sequence[int]) -> list[dict]:
  """Model detections -> COCO results, every valid detection kept (no score threshold).

  Args:
    image_ids: [B] COCO image ids.
    boxes_xyxy: [B, K, 4] absolute xyxy in original-image pixels (postprocess rescales them).
    scores: [B, K].
    labels: [B, K] contiguous class indices 0 .. C-1.
    valid: [B, K] bool, False for padding and dropped (empty) boxes; None keeps all.
    category_ids: [C] the COCO category id of each label.
  Returns:
    [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}] in image order.
  """
  boxes = np.asarray(boxes_xyxy, np.float64)
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels)
  if valid is None:
    valid = np.ones(labels.shape, bool)
  valid = np.asarray(valid, bool)
  image_ids = np.broadcast_to(np.asarray(image_ids)[:, None], labels.shape)
  if not boxes.shape[:-1] == scores.shape == labels.shape == valid.shape or boxes.shape[-1] != 4:
    raise ValueError(f"expected boxes [B, K, 4] and scores, labels, valid [B, K]; got "
                     f"{boxes.shape}, {scores.shape}, {labels.shape}, {valid.shape}")
  category_ids = np.asarray(category_ids)
  kept = labels[valid]
  if kept.size and (kept.min() < 0 or kept.max() >= len(category_ids)):
    raise ValueError(f"labels must lie in [0, {len(category_ids)}) to map to category ids "
                     f"{category_ids.tolist()}; got {kept.min()} .. {kept.max()}")
  xyxy = boxes[valid]
  # Two decimals of a pixel are far below what AP can see and halve the size of the json.
  xywh = np.round(np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=-1), 2)
  return [{"image_id": i, "category_id": c, "bbox": b, "score": s}
          for i, c, b, s in zip(image_ids[valid].tolist(), category_ids[kept].tolist(),
                                xywh.tolist(), scores[valid].tolist())]


def write_results(results: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> pathlib.Path:
  """Writes COCO results as JSON, atomically (a crash leaves the old file or none)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
  partial.write_text(json.dumps(list(results), separators=(",", ":")))
  os.replace(partial, path)
  return path


def _quiet():
  """pycocotools reports progress with print(); keep the console for our own table."""
  return contextlib.redirect_stdout(io.StringIO())


def _load_ground_truth(gt: str | os.PathLike | Mapping[str, Any]) -> COCO:
  if isinstance(gt, (str, os.PathLike)):
    source = str(gt)
    dataset = json.loads(pathlib.Path(gt).read_text())
  else:
    source = "the ground-truth dict"
    dataset = gt
  missing = [k for k in ("images", "annotations", "categories") if k not in dataset]
  if missing:
    raise ValueError(f"{source} is not COCO instances json: it lacks {missing}")
  if not dataset["annotations"]:
    raise ValueError(f"{source} has no annotations: COCO AP is undefined without ground-truth "
                     f"boxes (did you pass an unlabelled or test-dev split?)")
  for ann in dataset["annotations"]:
    lacking = [k for k in _REQUIRED_GT_KEYS if k not in ann]
    if lacking:
      raise ValueError(f"{source}: annotation {ann.get('id', '?')} of image "
                       f"{ann.get('image_id', '?')} lacks {lacking}, which COCO evaluation needs")
  # COCOeval writes an "ignore" flag into each annotation; work on copies, not the caller's dicts.
  dataset = {**dataset, "annotations": [dict(a) for a in dataset["annotations"]]}
  coco = COCO()
  coco.dataset = dataset
  with _quiet():
    coco.createIndex()
  return coco


def _load_results(gt: COCO, results: str | os.PathLike | Sequence[Mapping[str, Any]]) -> COCO:
  source = "the results"
  if isinstance(results, (str, os.PathLike)):
    source = str(results)
    results = json.loads(pathlib.Path(results).read_text())
  results = [dict(r) for r in results]  # loadRes adds fields to each dict.
  unknown_images = {r["image_id"] for r in results} - set(gt.getImgIds())
  if unknown_images:
    raise ValueError(f"{source} has detections on {len(unknown_images)} image ids that are not in "
                     f"the ground truth, e.g. {sorted(unknown_images)[:5]}")
  unknown_categories = {r["category_id"] for r in results} - set(gt.getCatIds())
  if unknown_categories:
    raise ValueError(f"{source} uses category ids {sorted(unknown_categories)} that the ground "
                     f"truth lacks (it has {sorted(gt.getCatIds())}); are labels mapped back to "
                     f"category ids?")
  if results:
    with _quiet():
      return gt.loadRes(results)
  # loadRes cannot take an empty list; an empty result set scores 0 like any other miss.
  empty = COCO()
  empty.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"],
                   "annotations": []}
  with _quiet():
    empty.createIndex()
  return empty


def _mean_defined(values: np.ndarray) -> float:
  """Mean over entries that pycocotools defined (> -1); -1 when there are none."""
  defined = values[values > -1]
  return float(defined.mean()) if defined.size else -1.0


def evaluate(gt: str | os.PathLike | Mapping[str, Any],
             results: str | os.PathLike | Sequence[Mapping[str, Any]], *,
             class_names: Sequence[str] | None = None, max_dets: int = 100) -> dict[str, Any]:
  """COCO box AP of `results` on all images of `gt`.

  Args:
    gt: COCO instances json (path or loaded dict), with annotations.
    results: COCO results (path or list of dicts with image_id, category_id, bbox xywh, score).
    class_names: names in the order of the sorted category ids (the contiguous labels); default
      the names in `gt`.
    max_dets: detections kept per image, highest scores first. The official evaluation uses 100;
      a 300-proposal model emits 300, which `max_dets=300` scores in full.
  Returns:
    AP, AP50, AP75, APs, APm, APl (at max_dets), AR@1, AR@10, AR@100 and AR@{max_dets}, ARs, ARm,
    ARl (at max_dets), per_class_AP {name: AP}, num_images, num_detections, max_dets.
  """
  coco_gt = _load_ground_truth(gt)
  coco_dt = _load_results(coco_gt, results)
  evaluator = COCOeval(coco_gt, coco_dt, "bbox")
  params = evaluator.params
  params.imgIds = sorted(coco_gt.getImgIds())
  params.maxDets = sorted({1, 10, 100, max_dets})
  with _quiet():
    evaluator.evaluate()
    evaluator.accumulate()

  # precision: [IoU thresholds, recall points, classes, areas, maxDets];
  # recall: [IoU thresholds, classes, areas, maxDets]; -1 where undefined.
  precision = evaluator.eval["precision"]
  recall = evaluator.eval["recall"]
  at_max = params.maxDets.index(max_dets)
  area = {label: i for i, label in enumerate(params.areaRngLbl)}  # all, small, medium, large
  iou = lambda t: np.flatnonzero(np.isclose(params.iouThrs, t))
  metrics = {
      "AP": _mean_defined(precision[..., area["all"], at_max]),
      "AP50": _mean_defined(precision[iou(0.5), ..., area["all"], at_max]),
      "AP75": _mean_defined(precision[iou(0.75), ..., area["all"], at_max]),
  }
  for label in ("small", "medium", "large"):
    metrics[f"AP{label[0]}"] = _mean_defined(precision[..., area[label], at_max])
  for m, dets in enumerate(params.maxDets):
    metrics[f"AR@{dets}"] = _mean_defined(recall[..., area["all"], m])
  for label in ("small", "medium", "large"):
    metrics[f"AR{label[0]}"] = _mean_defined(recall[..., area[label], at_max])

  if class_names is None:
    class_names = [coco_gt.cats[c]["name"] for c in params.catIds]
  if len(class_names) != len(params.catIds):
    raise ValueError(f"{len(class_names)} class names for {len(params.catIds)} categories "
                     f"{params.catIds}")
  metrics["per_class_AP"] = {name: _mean_defined(precision[:, :, k, area["all"], at_max])
                             for k, name in enumerate(class_names)}
  metrics["num_images"] = len(params.imgIds)
  metrics["num_detections"] = len(coco_dt.anns)
  metrics["max_dets"] = max_dets
  return metrics


def _percent(value: float) -> str:
  return "-" if value < 0 else f"{100 * value:.1f}"


def format_table(metrics: Mapping[str, Any], columns: int = 3) -> str:
  """A console table of `evaluate`'s metrics, in percent ('-' where undefined)."""
  recall_keys = [k for k in metrics if k.startswith("AR@")] + ["ARs", "ARm", "ARl"]
  lines = [f"COCO box evaluation: {metrics['num_images']} images, {metrics['num_detections']} "
           f"detections, at most {metrics['max_dets']} per image"]
  for keys in (["AP", "AP50", "AP75", "APs", "APm", "APl"], recall_keys):
    lines.append("  ".join(f"{k:>6}" for k in keys))
    lines.append("  ".join(f"{_percent(metrics[k]):>6}" for k in keys))
  per_class = list(metrics["per_class_AP"].items())
  if per_class:
    width = max(len(name) for name, _ in per_class)
    lines.append("per-class AP:")
    for start in range(0, len(per_class), columns):
      lines.append(" | ".join(f"{name:<{width}} {_percent(ap):>5}"
                              for name, ap in per_class[start:start + columns]))
  return "\n".join(lines)


def format_stages_table(per_stage: Sequence[Mapping[str, Any]]) -> str:
  """A console table of `evaluate`'s metrics per head stage (stage 1 first), in percent."""
  keys = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
  recall = next((k for k in per_stage[0] if k.startswith("AR@")), None) if per_stage else None
  keys += [recall] if recall else []
  lines = [f"COCO box AP of each head stage's predictions ({per_stage[0]['num_images']} "
           "images):" if per_stage else "no stages",
           "stage  " + "  ".join(f"{k:>6}" for k in keys)]
  for s, metrics in enumerate(per_stage, 1):
    lines.append(f"{s:>5}  " + "  ".join(f"{_percent(metrics[k]):>6}" for k in keys))
  return "\n".join(lines)
