"""Test-time augmentation (`eval.py --tta`) as the official Sparse R-CNN evaluates with it.

For each image and each short side s_i of config.tta.min_sizes (i = 0 .. A-1):
1. Resize the image so its short side is s_i and its long side at most tta.max_size
   (`transforms.resized_shape`); run the model on it and, with tta.flip, on its mirror image.
2. Keep each pass's k = N (num_proposals) highest of the N * C sigmoid scores, as
   `postprocess.py` does, with boxes in the augmented image's pixels, not clipped.
3. Scale filter: keep a box only if lo_i^2 < w * h < hi_i^2 in those pixels, (lo_i, hi_i) =
   tta.scale_ranges[i]: small scales keep the large objects, large scales the small ones.
4. Map the kept boxes to the original image: un-mirror x1, x2 -> W - x2, W - x1 (W the
   augmented width), then x * orig_w / W and y * orig_h / H.
All passes' detections of the image (scale 0 plain, scale 0 mirrored, scale 1 plain, ...) are
merged by soft voting (`merge_detections`), cut to the max_detections highest and clipped to the
image. The official merge, per class, in descending score order: the highest remaining box heads
a cluster of the remaining boxes with IoU >= vote_iou (0.65) to it, itself included; a cluster
of one stays as it is; a larger one becomes one box, the score-weighted mean of its boxes with
the highest score, plus each member again with score * (1 - IoU) where that is >= 0.05 (the
head, with IoU 1, never is). All results are then sorted by score.

Where we differ from the official code, and why:
- detectron2 resizes the test-resized image (short side 800) again to each s_i; we resize the
  original image once per scale. Same geometry, but pixels are resampled once instead of twice,
  and the rounded size of the augmented image can differ by a pixel.
- The official vote separates classes by shifting each box by label * (largest coordinate + 1);
  we vote per class. The shift keeps classes apart unless a box reaches more than a pixel above
  or left of the image, which can then (rarely) merge with another class's box; we never do.
- Boxes without area: the official IoU is 0/0 = NaN for them, so they neither join a cluster
  nor stay, and vanish; we drop them up front (the same result). The official loop would never
  end on a box with x2 < x1 or y2 < y1; we drop those too (the model does not make them).
- Ties in score: the official sorts are not stable; ours keep, among equal scores, the order
  in which the official loop emits results (the head's score rank, then the member's).
- A cluster whose scores are all 0 (sigmoid underflow): the official mean is 0/0 = NaN; we keep
  the head's box.
"""
import collections
import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from sparse_rcnn_jax.data import batching
from sparse_rcnn_jax.data import pipeline
from sparse_rcnn_jax.data import transforms
from sparse_rcnn_jax.evaluation import coco_eval
from sparse_rcnn_jax.evaluation import inference
from sparse_rcnn_jax.evaluation import postprocess

# A cluster member re-enters the results with score * (1 - IoU) only from this score on.
SOFT_SCORE_MIN = 0.05
PREDICTION_KEYS = ("boxes", "scores", "labels", "keep")
BATCH_KEYS = ("image", "image_whwh", "orig_size", "image_id", "valid")


@dataclasses.dataclass(frozen=True)
class TtaSettings:
  """config.tta, checked (configs/r50_100pro_3x.py documents the fields).

  Attributes:
    min_sizes: A short sides, one per scale.
    max_size: the longest side after resizing.
    flip: also run every scale mirrored.
    scale_ranges: A (lo, hi) box sides in augmented pixels, one per scale.
    vote_iou: the IoU from which boxes of one class vote together.
    max_detections: results kept per image, the highest scores.
  """
  min_sizes: tuple[int, ...]
  max_size: int
  flip: bool
  scale_ranges: tuple[tuple[float, float], ...]
  vote_iou: float
  max_detections: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "TtaSettings":
    """From config.tta; max_detections None or 0 means config.model.num_proposals, and empty
    scale_ranges means no scale filter."""
    if "tta" not in config:
      raise ValueError("The config has no `tta` section (a run trained before test-time "
                       "augmentation existed?): pass --config with a recipe from configs/, "
                       "which all define it.")
    tta = config.tta
    min_sizes = tuple(int(s) for s in tta.min_sizes)
    ranges = tuple((float(lo), float(hi)) for lo, hi in tta.scale_ranges) or (
        ((0.0, math.inf),) * len(min_sizes))
    if not min_sizes or min(min_sizes) <= 0:
      raise ValueError(f"config.tta.min_sizes must be positive short sides, got {min_sizes}")
    if len(ranges) != len(min_sizes):
      raise ValueError(f"config.tta.scale_ranges has {len(ranges)} (lo, hi) pairs for "
                       f"{len(min_sizes)} config.tta.min_sizes {min_sizes}: give one per scale, "
                       "or () for no scale filter")
    if not 0.0 < tta.vote_iou <= 1.0:
      raise ValueError(f"config.tta.vote_iou must lie in (0, 1], got {tta.vote_iou}")
    return cls(min_sizes=min_sizes, max_size=int(tta.max_size), flip=bool(tta.flip),
               scale_ranges=ranges, vote_iou=float(tta.vote_iou),
               max_detections=int(tta.max_detections or config.model.num_proposals))


def flip_images(images: jax.Array, widths: jax.Array) -> jax.Array:
  """Mirrors each image of a padded batch within its own width; padding stays bottom/right.

  Args:
    images: [B, H, W, C], image b in columns 0 .. widths[b] - 1, zeros beyond.
    widths: [B] int, each image's unpadded width.
  Returns:
    [B, H, W, C]: column x of image b is its column widths[b] - 1 - x; padding zeros.
  """
  column = jnp.arange(images.shape[2])
  source = widths[:, None] - 1 - column[None, :]   # [B, W]
  mirrored = jnp.take_along_axis(images, jnp.maximum(source, 0)[:, None, :, None], axis=2)
  return jnp.where((source >= 0)[:, None, :, None], mirrored, jnp.zeros((), images.dtype))


def scale_filter(boxes, scale_range):
  """Which boxes [..., 4] (xyxy) have lo^2 < area < hi^2; scale_range [..., 2] = (lo, hi)
  broadcasts against boxes[..., 0]. NumPy or jax arrays."""
  area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
  low, high = scale_range[..., 0], scale_range[..., 1]
  return (area > low * low) & (area < high * high)


def to_original(boxes: jax.Array, image_whwh: jax.Array, orig_size: jax.Array,
                mirrored: bool) -> jax.Array:
  """Boxes [B, k, 4] xyxy in augmented pixels -> original-image pixels, not clipped.

  image_whwh: [B, 4] the augmented image's (w, h, w, h); orig_size: [B, 2] the original (h, w).
  With `mirrored` the boxes were found on the mirror image and are un-mirrored first.
  """
  if mirrored:
    width = image_whwh[:, 0, None]
    boxes = jnp.stack([width - boxes[..., 2], boxes[..., 1], width - boxes[..., 0],
                       boxes[..., 3]], axis=-1)
  scale = orig_size[:, ::-1].astype(boxes.dtype) / image_whwh[:, :2]
  return boxes * jnp.tile(scale, 2)[:, None, :]


def make_predict_fn(model, mesh, flip: bool) -> Callable:
  """jit(variables, batch) -> one scale's detections of every image, plain and mirrored.

  Built once and used for every scale (it compiles once per bucket shape). The batch holds
  BATCH_KEYS as in data/batching.py and "scale_range" [B, 2], the scale's (lo, hi). Returns,
  with F = 2 passes (plain, mirrored) with `flip`, else 1, and k = N: "boxes" [B, F, k, 4] xyxy
  in original-image pixels, not clipped; "scores" [B, F, k] (descending in each pass),
  "labels" [B, F, k] int32, and "keep" [B, F, k] bool, the scale filter on the augmented
  image's boxes.
  """
  def predict(variables, batch):
    widths = batch["image_whwh"][:, 0].astype(jnp.int32)
    passes = []
    for mirrored in (False, True) if flip else (False,):
      images = flip_images(batch["image"], widths) if mirrored else batch["image"]
      out = model.apply(variables, images, batch["image_whwh"])
      logits, boxes = out["pred_logits"][-1], out["pred_boxes"][-1]
      scores, labels, boxes, _ = postprocess.top_k(logits, boxes, logits.shape[1])
      passes.append({
          "boxes": to_original(boxes, batch["image_whwh"], batch["orig_size"], mirrored),
          "scores": scores, "labels": labels,
          "keep": scale_filter(boxes, batch["scale_range"][:, None, :])})
    return jax.tree.map(lambda *x: jnp.stack(x, axis=1), *passes)
  return inference.jit_on_mesh(predict, mesh)


def _iou_with(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """IoU of one xyxy box [4] with each of boxes [n, 4] (all with positive area) -> [n]."""
  inter_w = np.maximum(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0.0)
  inter_h = np.maximum(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0.0)
  inter = inter_w * inter_h
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  return inter / ((box[2] - box[0]) * (box[3] - box[1]) + area - inter)


def _vote_one_class(boxes: np.ndarray, scores: np.ndarray, rank: np.ndarray, vote_iou: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Soft voting among one class's detections (module docstring).

  Args:
    boxes: [n, 4] xyxy with positive areas; scores: [n]; both in descending score order.
    rank: [n] each detection's place in the descending order of all the image's detections.
  Returns:
    boxes [m, 4], scores [m], and keys [m, 2] = (rank of the cluster's head, rank of the
    detection; the head's for a merged box): the order the official loop emits results in.
  """
  out_boxes, out_scores, out_keys = [], [], []
  todo = np.arange(len(scores))
  while todo.size:
    head = todo[0]
    iou = _iou_with(boxes[head], boxes[todo])
    near = iou >= vote_iou
    cluster, todo = todo[near], todo[~near]
    weights = scores[cluster]
    # A lone box stays bit for bit (a mean of one could round); zero weights: module docstring.
    if cluster.size == 1 or not weights.sum() > 0:
      merged = boxes[head]
    else:
      merged = (boxes[cluster] * weights[:, None]).sum(axis=0) / weights.sum()
    out_boxes.append(merged[None])
    out_scores.append(weights.max(keepdims=True))
    out_keys.append([[rank[head], rank[head]]])
    # The head's IoU with itself is exactly 1, so it never re-enters.
    soft = weights * (1.0 - iou[near])
    stays = soft >= SOFT_SCORE_MIN
    out_boxes.append(boxes[cluster[stays]])
    out_scores.append(soft[stays])
    out_keys.append(np.stack([np.full(stays.sum(), rank[head]), rank[cluster[stays]]], axis=1))
  return (np.concatenate(out_boxes), np.concatenate(out_scores),
          np.concatenate(out_keys).astype(np.int64))


def merge_detections(boxes, scores, labels, image_hw: tuple[int, int], vote_iou: float = 0.65,
                     max_detections: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One image's detections from all augmentations -> the official soft-vote merge.

  Args:
    boxes: [n, 4] absolute xyxy in original-image pixels, not clipped.
    scores: [n]; labels: [n] int.
    image_hw: the original image's (h, w), to clip to.
    vote_iou: IoU from which boxes of one class vote together.
    max_detections: keep the first this many after sorting; None or 0 keeps all.
  Returns:
    boxes [m, 4] float64 clipped to the image (some may be left empty, kept as the official
    code does), scores [m] descending, labels [m] int64.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  scores = np.asarray(scores, np.float64).reshape(-1)
  labels = np.asarray(labels, np.int64).reshape(-1)
  has_area = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  boxes, scores, labels = boxes[has_area], scores[has_area], labels[has_area]
  rank = np.empty(len(scores), np.int64)
  rank[np.argsort(-scores, kind="stable")] = np.arange(len(scores))
  pieces = []
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    members = members[np.argsort(rank[members])]
    voted = _vote_one_class(boxes[members], scores[members], rank[members], vote_iou)
    pieces.append(voted + (np.full(len(voted[1]), label),))
  if not pieces:
    return np.zeros((0, 4)), np.zeros((0,)), np.zeros((0,), np.int64)
  boxes, scores, keys, labels = (np.concatenate(p) for p in zip(*pieces))
  order = np.lexsort((keys[:, 1], keys[:, 0], -scores))[:max_detections or None]
  height, width = image_hw
  boxes = np.clip(boxes[order], 0.0, [width, height, width, height])
  return boxes, scores[order], labels[order]


def scale_resize(data: ml_collections.ConfigDict, image_sizes: np.ndarray | None, min_size: int,
                 max_size: int, size_divisibility: int
                 ) -> tuple[transforms.AugmentConfig, list[tuple[int, int]]]:
  """The resize to short side `min_size` (long side at most `max_size`) and its bucket shapes,
  for pipeline.eval_iterator.

  Buckets: the plain evaluation's rule at this scale (batching.default_buckets with a long side
  of min_size * data.max_size / data.test_scale), which holds the usual images without much
  padding, plus the rule's buckets for the longest resized image (`image_sizes` [N, 2] (h, w),
  or max_size when unknown). config.data.buckets, fixed shapes for the test scale, does not
  apply here.
  """
  longest = max_size
  if image_sizes is not None and len(image_sizes):
    heights, widths = transforms.resized_shape(image_sizes[:, 0], image_sizes[:, 1], min_size,
                                               max_size)
    longest = int(max(heights.max(), widths.max()))
  usual = min(longest, math.ceil(min_size * data.max_size / data.test_scale))
  buckets = set(batching.default_buckets(min_size, usual, size_divisibility))
  buckets |= set(batching.default_buckets(min_size, longest, size_divisibility))
  return transforms.AugmentConfig(scales=(min_size,), max_size=max_size), sorted(buckets)


def _with_scale_range(batches, scale_range: tuple[float, float]):
  """The batches' model inputs and slot ids (no ground truth to transfer), and the scale's
  (lo, hi) for every image."""
  for batch in batches:
    yield {**{k: batch[k] for k in BATCH_KEYS},
           "scale_range": np.tile(np.float32(scale_range), (len(batch["valid"]), 1))}


def predict_all_scales(predict_fn, variables, config: ml_collections.ConfigDict, mesh, source,
                       tta: TtaSettings, size_divisibility: int) -> tuple[dict, dict]:
  """Every scale's kept detections of every image of `source`, in original-image pixels,
  images padded to multiples of `size_divisibility` (the backbone's).

  Returns ({image_id: [(boxes [n, 4], scores [n], labels [n]), ...] in the order scale 0
  plain, scale 0 mirrored, scale 1 plain, ...}, {image_id: (h, w)}), on every host.
  """
  per_image, sizes = collections.defaultdict(list), {}
  num_batches = -(-len(source) // config.data.eval_batch_size)
  with tqdm.tqdm(total=len(tta.min_sizes) * num_batches, desc="TTA scales x batches",
            dynamic_ncols=True, disable=jax.process_index() != 0) as progress:
    for min_size, scale_range in zip(tta.min_sizes, tta.scale_ranges):
      progress.set_postfix(short_side=min_size)
      batches = pipeline.eval_iterator(
          config.data, source, jax.process_index(), jax.process_count(),
          size_divisibility=size_divisibility,
          resize=scale_resize(config.data, source.image_sizes, min_size, tta.max_size,
                              size_divisibility))
      for dets, local in inference.gathered_predictions(
          predict_fn, variables, _with_scale_range(batches, scale_range), mesh,
          PREDICTION_KEYS):
        if dets["boxes"].shape[1] != (2 if tta.flip else 1):
          raise ValueError(f"predict_fn makes {dets['boxes'].shape[1]} passes per scale but "
                           f"config.tta.flip is {tta.flip}: build it with "
                           f"make_predict_fn(model, mesh, flip={tta.flip})")
        for i in np.flatnonzero(local["valid"]):
          keep = dets["keep"][i].reshape(-1)
          image_id = int(local["image_id"][i])
          per_image[image_id].append((dets["boxes"][i].reshape(-1, 4)[keep],
                                      dets["scores"][i].reshape(-1)[keep],
                                      dets["labels"][i].reshape(-1)[keep]))
          sizes[image_id] = tuple(int(v) for v in local["orig_size"][i])
        progress.update()
  return per_image, sizes


def evaluate_split(predict_fn, variables, config: ml_collections.ConfigDict, mesh, source,
                   results_path=None, *, size_divisibility: int) -> dict:
  """COCO evaluation of the eval `source` with test-time augmentation (module docstring).

  `predict_fn` is make_predict_fn's with flip=config.tta.flip, built once per run; images are
  padded to multiples of `size_divisibility` (the model's backbone's). Returns the
  metrics of coco_eval.evaluate; the lead host writes the merged detections to
  `results_path` if given.
  """
  tta = TtaSettings.from_config(config)
  per_image, sizes = predict_all_scales(predict_fn, variables, config, mesh, source, tta,
                                        size_divisibility)
  results = []
  for image_id, found in per_image.items():
    boxes, scores, labels = (np.concatenate(parts) for parts in zip(*found))
    boxes, scores, labels = merge_detections(boxes, scores, labels, sizes[image_id],
                                             tta.vote_iou, tta.max_detections)
    results += coco_eval.detections_to_coco([image_id], boxes[None], scores[None],
                                             labels[None], None, source.category_ids)
  if results_path is not None and jax.process_index() == 0:
    coco_eval.write_results(results, results_path)
  return coco_eval.evaluate(source.coco_gt(), results, class_names=source.class_names,
                             max_dets=max(100, tta.max_detections))
