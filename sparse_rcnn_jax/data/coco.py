"""COCO-format folders: read and validate an instances json, then serve its images.

A COCO folder is an instances json (`images`, `annotations`, `categories`, as in COCO's
`instances_train2017.json`) and a folder holding the files named by `images[*].file_name`. This is
how users bring their own datasets. `read_coco` validates everything once (tqdm bars on big files)
into a compact `CocoTable`; `CocoSource` serves it through the `DetectionSource` interface.

Labels: category ids sorted ascending and numbered 0..C-1 (COCO's 1..90 with gaps -> 0..79);
`label_to_category_id` maps back. Crowd boxes are kept in the table and in `coco_gt()`, and left
out of the training examples. Images without boxes are kept.

Bad input:
- Always an error (the file is unusable): annotation file missing, empty, not JSON, not an
  object, without an `images` or `categories` list, without images or categories, duplicate image
  or category ids, an image entry without an integer `id` and a string `file_name`.
- Bad annotations, under `on_bad_annotation` ("error": raise naming the json, the annotation and
  the problem; "skip": drop it and log counts per kind): unknown image id, unknown category id,
  bbox not 4 finite numbers, width or height <= 0, box outside the image by more than
  BOX_TOLERANCE pixels (boxes within it are clipped).
- Bad images, under `on_bad_image` ("skip": drop the image with a logged count; "error": raise
  naming the file): a missing image file, or an unreadable header where the json lacks the size,
  found here at scan time; undecodable or wrongly sized images are found when decoding (see
  pipeline.py for what a skipped image becomes in a batch).
A missing `width`/`height` is read from the image header (EXIF orientation applied).
"""
import collections
import dataclasses
import json
import math
import numbers
import os
from typing import Any

from absl import logging
import numpy as np
import tqdm

from sparse_rcnn_jax.data import source as source_lib

# Boxes may overshoot the image by this many pixels (rounding in annotation tools); they are
# clipped. Beyond it the box does not describe this image.
BOX_TOLERANCE = 1.0
POLICIES = ("error", "skip")
# Below this many entries a progress bar is noise.
_TQDM_MIN = 50_000


@dataclasses.dataclass(frozen=True)
class CocoTable:
  """Validated content of one COCO json: N images, T boxes, boxes grouped by image.

  Image i owns box rows box_start[i]:box_start[i + 1].
  Attributes:
    ann_path, image_dir: where it was read from.
    class_names, category_ids: C entries, index = contiguous label.
    image_ids: int64 [N]; sizes: int32 [N, 2] (h, w) displayed; file_names: N names.
    box_start: int64 [N + 1].
    boxes: float64 [T, 4] absolute xyxy (clipped to the image).
    labels: int32 [T]; is_crowd: bool [T]; areas: float64 [T] (the json's `area`, which
      COCOeval uses for its small/medium/large ranges; box area when absent).
  """
  ann_path: str
  image_dir: str
  class_names: tuple[str, ...]
  category_ids: tuple[int, ...]
  image_ids: np.ndarray
  sizes: np.ndarray
  file_names: tuple[str, ...]
  box_start: np.ndarray
  boxes: np.ndarray
  labels: np.ndarray
  is_crowd: np.ndarray
  areas: np.ndarray


def _is_int(x: Any) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _short(x: Any, limit: int = 120) -> str:
  text = repr(x)
  return text if len(text) <= limit else text[:limit] + "..."


def _check_policy(name: str, value: str) -> None:
  if value not in POLICIES:
    raise ValueError(f"config.data.{name} must be one of {POLICIES}, got {value!r}")


def load_json(path: str) -> dict[str, Any]:
  """Reads a COCO json and checks its top-level structure; errors name the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"COCO annotation file {path} does not exist")
  logging.info("Reading %s", path)
  with open(path, "rb") as f:
    raw = f.read()
  expected = "a COCO json object with 'images', 'annotations' and 'categories'"
  if not raw.strip():
    raise ValueError(f"{path} is empty; expected {expected}")
  try:
    data = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e}); expected {expected}") from None
  if not isinstance(data, dict):
    raise ValueError(f"{path} holds a JSON {type(data).__name__}; expected {expected}")
  for key in ("images", "categories"):
    if not isinstance(data.get(key), list):
      raise ValueError(f"{path} has no '{key}' list; expected {expected}")
  if not isinstance(data.get("annotations", []), list):
    raise ValueError(f"{path}: 'annotations' must be a list")
  if not data["images"]:
    raise ValueError(f"{path} has no images: a dataset needs at least one")
  if not data["categories"]:
    raise ValueError(f"{path} has no categories: a detector needs at least one class")
  return data


def _read_categories(path: str, categories: list[Any]) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """(names, ids) sorted by category id."""
  by_id = {}
  for k, cat in enumerate(categories):
    cat_id = cat.get("id") if isinstance(cat, dict) else None
    if not _is_int(cat_id):
      raise ValueError(f"{path}: categories[{k}] needs an integer 'id', got {_short(cat)}")
    if cat_id in by_id:
      raise ValueError(f"{path}: category id {cat_id} appears twice")
    by_id[cat_id] = str(cat.get("name", cat_id))
  ids = tuple(sorted(by_id))
  return tuple(by_id[i] for i in ids), ids


def _entry_size(path: str, file: str, entry: dict[str, Any]) -> tuple[int, int]:
  """(h, w) of an image entry: the json's, else the file header's.

  Raises:
    BadImageError: the file is missing, or its header is unreadable when needed.
  """
  if not os.path.isfile(file):
    raise source_lib.BadImageError(
        f"{file}: image file of image id {entry['id']} (listed in {path}) does not exist")
  h, w = entry.get("height"), entry.get("width")
  if _is_int(h) and _is_int(w) and h > 0 and w > 0:
    return h, w
  try:
    return source_lib.image_size(file)
  except Exception as e:  # pylint: disable=broad-except
    raise source_lib.BadImageError(
        f"{file}: cannot read the image header ({type(e).__name__}: {e})") from e


def _read_images(path: str, image_dir: str, images: list[Any], on_bad_image: str
                 ) -> tuple[list[tuple[int, str, int, int]], set[int]]:
  """Validates image entries: ([(id, file_name, h, w)] kept, ids of images dropped)."""
  kept, dropped, seen, problems = [], set(), set(), []
  for k, entry in enumerate(tqdm.tqdm(images, desc=f"images of {os.path.basename(path)}",
                                      disable=len(images) < _TQDM_MIN)):
    if not (isinstance(entry, dict) and _is_int(entry.get("id"))
            and isinstance(entry.get("file_name"), str)):
      raise ValueError(f"{path}: images[{k}] needs an integer 'id' and a string 'file_name', "
                       f"got {_short(entry)}")
    image_id, file_name = entry["id"], entry["file_name"]
    if image_id in seen:
      raise ValueError(f"{path}: image id {image_id} appears twice")
    seen.add(image_id)
    try:
      h, w = _entry_size(path, os.path.join(image_dir, file_name), entry)
    except source_lib.BadImageError as e:
      if on_bad_image == "error":
        raise
      dropped.add(image_id)
      problems.append(str(e))
      continue
    kept.append((image_id, file_name, h, w))
  if problems:
    logging.warning("Skipped %d of %d images of %s (on_bad_image='skip'), e.g. %s",
                    len(problems), len(images), path, problems[0])
  if not kept:
    raise ValueError(f"{path}: none of its {len(images)} images could be used (e.g. "
                     f"{problems[0]})")
  return kept, dropped


def _check_box(bbox: Any, h: int, w: int) -> tuple[str, str] | tuple[None, list[float]]:
  """(problem kind, detail) for a bad COCO bbox, else (None, clipped xyxy)."""
  if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(map(_is_number, bbox))):
    return "malformed bbox", f"bbox must be 4 numbers [x, y, width, height], got {_short(bbox)}"
  x, y, bw, bh = map(float, bbox)
  if not all(map(math.isfinite, (x, y, bw, bh))):
    return "non-finite bbox", f"bbox {bbox} has a NaN or infinite value"
  if bw <= 0 or bh <= 0:
    return "empty bbox", f"bbox {bbox} has width or height <= 0"
  if (x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + bw > w + BOX_TOLERANCE
      or y + bh > h + BOX_TOLERANCE):
    return "bbox outside image", f"bbox {bbox} extends outside the {w}x{h} (w x h) image"
  x1, y1 = max(x, 0.0), max(y, 0.0)
  x2, y2 = min(x + bw, float(w)), min(y + bh, float(h))
  if x2 <= x1 or y2 <= y1:
    return "bbox outside image", f"bbox {bbox} has no area inside the {w}x{h} (w x h) image"
  return None, [x1, y1, x2, y2]


def _check_annotation(ann: Any, index_of: dict[int, int], label_of: dict[int, int],
                      images: list[tuple[int, str, int, int]]) -> tuple[Any, Any]:
  """(problem kind, detail) for a bad annotation, else (None, its table row).

  A row is (image index, label, x1, y1, x2, y2, is_crowd, area).
  """
  if not isinstance(ann, dict):
    return "malformed annotation", f"expected an object, got {_short(ann)}"
  image_id, category_id = ann.get("image_id"), ann.get("category_id")
  if not (_is_int(image_id) and image_id in index_of):
    return "unknown image", f"image_id {_short(image_id)} is not in 'images'"
  if not (_is_int(category_id) and category_id in label_of):
    return "unknown category", f"category_id {_short(category_id)} is not in 'categories'"
  index = index_of[image_id]
  _, _, h, w = images[index]
  kind, detail = _check_box(ann.get("bbox"), h, w)
  if kind is not None:
    return kind, detail
  x1, y1, x2, y2 = detail
  area = ann.get("area")
  area = float(area) if _is_number(area) and area > 0 else (x2 - x1) * (y2 - y1)
  return None, (index, label_of[category_id], x1, y1, x2, y2, bool(ann.get("iscrowd", 0)), area)


def read_coco(ann_path: str, image_dir: str, on_bad_annotation: str = "error",
              on_bad_image: str = "skip") -> CocoTable:
  """Reads and validates a COCO instances json and checks its image files exist.

  Args:
    ann_path: the instances json.
    image_dir: the folder the json's `file_name`s are relative to.
    on_bad_annotation, on_bad_image: "error" or "skip" (module docstring).
  Returns:
    The validated table.
  Raises:
    FileNotFoundError, ValueError, BadImageError: naming the file and the offending entry.
  """
  _check_policy("on_bad_annotation", on_bad_annotation)
  _check_policy("on_bad_image", on_bad_image)
  ann_path, image_dir = os.fspath(ann_path), os.fspath(image_dir)
  data = load_json(ann_path)
  class_names, category_ids = _read_categories(ann_path, data["categories"])
  label_of = {c: label for label, c in enumerate(category_ids)}
  images, dropped = _read_images(ann_path, image_dir, data["images"], on_bad_image)
  index_of = {image_id: i for i, (image_id, _, _, _) in enumerate(images)}

  rows, skipped, first_skip = [], collections.Counter(), None
  annotations = data.get("annotations", [])
  for k, ann in enumerate(tqdm.tqdm(annotations, desc=f"boxes of {os.path.basename(ann_path)}",
                                    disable=len(annotations) < _TQDM_MIN)):
    image_id = ann.get("image_id") if isinstance(ann, dict) else None
    if _is_int(image_id) and image_id in dropped:
      continue  # Counted with its image.
    kind, detail = _check_annotation(ann, index_of, label_of, images)
    if kind is None:
      rows.append(detail)
      continue
    where = (f"annotation {_short(ann.get('id', f'#{k}'))} (image id "
             f"{_short(ann.get('image_id'))})" if isinstance(ann, dict) else f"annotations[{k}]")
    if on_bad_annotation == "error":
      raise ValueError(f"{ann_path}: {where}: {detail}. Fix the annotation, or set "
                       "config.data.on_bad_annotation='skip' to drop such annotations.")
    skipped[kind] += 1
    first_skip = first_skip or f"{where}: {detail}"
  if skipped:
    logging.warning("Skipped %d annotations of %s (on_bad_annotation='skip'): %s; e.g. %s",
                    sum(skipped.values()), ann_path, dict(skipped), first_skip)

  table = np.array(sorted(rows, key=lambda r: r[0]), dtype=np.float64).reshape(-1, 8)
  box_image = table[:, 0].astype(np.int64)
  return CocoTable(
      ann_path=ann_path, image_dir=image_dir, class_names=class_names,
      category_ids=category_ids,
      image_ids=np.array([i[0] for i in images], np.int64),
      sizes=np.array([(i[2], i[3]) for i in images], np.int32).reshape(-1, 2),
      file_names=tuple(i[1] for i in images),
      box_start=np.concatenate([[0], np.cumsum(np.bincount(box_image, minlength=len(images)))]),
      boxes=table[:, 2:6], labels=table[:, 1].astype(np.int32),
      is_crowd=table[:, 6].astype(bool), areas=table[:, 7])


class CocoSource(source_lib.DetectionSource):
  """A validated COCO folder as a `DetectionSource`."""

  def __init__(self, ann_path: str, image_dir: str, on_bad_annotation: str = "error",
               on_bad_image: str = "skip"):
    self.table = read_coco(ann_path, image_dir, on_bad_annotation, on_bad_image)
    t = self.table
    self.ann_path = t.ann_path
    self.class_names = t.class_names
    self.label_to_category_id = t.category_ids
    self.image_sizes = t.sizes
    box_image = np.repeat(np.arange(len(t.image_ids)), np.diff(t.box_start))
    self.num_boxes = np.bincount(box_image[~t.is_crowd], minlength=len(t.image_ids))

  @classmethod
  def from_config(cls, data, split: str) -> "CocoSource":
    """Split "train" or "eval" of `config.data` (its {split}_ann and {split}_images)."""
    ann, images = ((data.train_ann, data.train_images) if split == "train"
                   else (data.eval_ann, data.eval_images))
    if not ann or not images:
      raise ValueError(f"config.data.{split}_ann and config.data.{split}_images must name a "
                       "COCO instances json and its image folder")
    return cls(ann, images, data.on_bad_annotation, data.on_bad_image)

  def __len__(self) -> int:
    return len(self.table.image_ids)

  def example(self, index: int) -> source_lib.Example:
    t = self.table
    rows = slice(t.box_start[index], t.box_start[index + 1])
    keep = ~t.is_crowd[rows]
    image = source_lib.decode_image(os.path.join(t.image_dir, t.file_names[index]),
                                    expected_size=tuple(t.sizes[index]))
    return source_lib.Example(image=image, boxes=t.boxes[rows][keep].astype(np.float32),
                              labels=t.labels[rows][keep], image_id=int(t.image_ids[index]),
                              orig_size=image.shape[:2])

  def coco_gt(self) -> dict[str, Any]:
    t = self.table
    box_image = np.repeat(t.image_ids, np.diff(t.box_start))
    return source_lib.build_coco_gt(
        t.class_names, t.category_ids,
        images=zip(t.image_ids, t.sizes[:, 0], t.sizes[:, 1]),
        # Fresh ids: pycocotools indexes annotations by id, and user files may repeat or omit them.
        annotations=zip(range(1, len(t.labels) + 1), box_image, t.labels, t.boxes, t.areas,
                        t.is_crowd))
