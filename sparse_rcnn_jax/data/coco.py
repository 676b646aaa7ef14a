"""COCO-format folders: read and validate an instances json, then serve its images.

A COCO folder is an instances json (`images`, `annotations`, `categories`, as in COCO's
`instances_train2017.json`) and a folder holding the files named by `images[*].file_name`. This is
how users bring their own datasets. `read_coco` validates everything once (tqdm bars on big files)
into a compact `CocoTable`; `CocoSource` serves it through the `DetectionSource` interface.

Labels: category ids sorted ascending and numbered 0..C-1 (COCO's 1..90 with gaps -> 0..79);
`category_ids` maps back. Crowd boxes are kept in the table and in `coco_gt()`, and left
out of the training examples. Images without boxes are kept.

Bad input (every problem of a kind is reported at once, counted, with the first examples):
- Always an error (the file is unusable): annotation file missing, empty, not JSON, not an
  object, without an `images` or `categories` list, without images or categories, duplicate image
  or category ids, an image entry without an integer `id` and a string `file_name`.
- Bad annotations, under `on_bad_annotation` ("error": one DataError listing them all; "skip":
  drop them, one warning): unknown image id, unknown category id, bbox not 4 finite numbers,
  width or height <= 0, no area inside the image, and (under "error" only) a box crossing the
  border by more than BOX_TOLERANCE pixels. Boxes within it are clipped; under "skip" a box
  crossing further is clipped too, and counted.
- Bad images, under `on_bad_image` ("skip": leave them out, one warning; "error": one DataError
  listing them all), found before training by `check` (config.data.check): "headers" (default)
  reads every header and file end: missing or empty file, unreadable header, JPEG or PNG cut
  short, size (EXIF orientation applied) other than the json's, a photo annotated in its stored
  pixels but displayed rotated by EXIF; "decode" decodes every image as well; "off" only
  checks that files exist. What only decoding finds is met when the image is drawn (see
  pipeline.py for what a skipped image becomes in a batch).
A missing file whose name exists on disk in another Unicode normalization (NFC / NFD) says so.
A missing `width`/`height` is read from the image header (EXIF orientation applied).
"""
import concurrent.futures
import dataclasses
import json
import math
import numbers
import os
from typing import Any

from absl import logging
import numpy as np
import tqdm

from sparse_rcnn_jax.data import layout
from sparse_rcnn_jax.data import source as source_lib

# Boxes may overshoot the image by this many pixels (rounding in annotation tools); they are
# clipped. Beyond it the box does not describe this image.
BOX_TOLERANCE = 1.0
POLICIES = ("error", "skip")
# config.data.check: how image files are checked before the first step (read_coco).
CHECKS = ("headers", "decode", "off")
_CHECK_THREADS = 8
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
    num_clipped: boxes that crossed the border by more than BOX_TOLERANCE, clipped (under
      on_bad_annotation="skip").
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
  num_clipped: int = 0


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


def stopping_problems(scan: "CocoScan", on_bad_image: str,
                      on_bad_annotation: str) -> tuple[str, ...]:
  """The policies' one rule: which kinds of problem `scan` found stop a run, "image" (under
  on_bad_image="error") and/or "annotation" (under on_bad_annotation="error"); the others are
  skipped. read_coco raises for them, data/check.py reports them."""
  _check_policy("on_bad_image", on_bad_image)
  _check_policy("on_bad_annotation", on_bad_annotation)
  return tuple(kind for kind, problems, policy in (
      ("image", scan.image_problems, on_bad_image),
      ("annotation", scan.annotation_problems, on_bad_annotation))
      if problems and policy == "error")


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


def _check_image(path: str, image_dir: str, entry: dict[str, Any], check: str
                 ) -> tuple[int, int]:
  """(h, w) of an image entry: the json's when it gives one, checked against the file as `check`
  says ("headers", "decode" or "off": the file only has to exist); else the header's.

  Raises:
    BadImageError: naming the file and the json, with its kind.
  """
  file = os.path.join(image_dir, entry["file_name"])
  h, w = entry.get("height"), entry.get("width")
  expected = (h, w) if _is_int(h) and _is_int(w) and h > 0 and w > 0 else None
  try:
    if check == "off" and expected is not None:
      if not os.path.isfile(file):
        raise source_lib.BadImageError(
            f"{file}: image file does not exist"
            f"{source_lib.missing_file_hint(image_dir, entry['file_name'])}", "missing file")
      return expected
    return source_lib.read_header(file, expected, decode=check == "decode")
  except source_lib.BadImageError as e:
    raise source_lib.BadImageError(f"{e} (image id {entry['id']} of {path})", e.kind) from e


def _read_images(path: str, image_dir: str, images: list[Any], check: str
                 ) -> tuple[list[tuple[int, str, int, int]], set[int], source_lib.Problems]:
  """Validates image entries and checks their files: ([(id, file_name, h, w)] of the good
  ones, ids of the bad ones, their problems).

  Files are checked in threads (on a network disk the time is mostly waiting).
  """
  seen = set()
  for k, entry in enumerate(images):
    if not (isinstance(entry, dict) and _is_int(entry.get("id"))
            and isinstance(entry.get("file_name"), str)):
      raise ValueError(f"{path}: images[{k}] needs an integer 'id' and a string 'file_name', "
                       f"got {_short(entry)}")
    if entry["id"] in seen:
      raise ValueError(f"{path}: image id {entry['id']} appears twice")
    seen.add(entry["id"])

  def one(entry):
    try:
      return _check_image(path, image_dir, entry, check)
    except source_lib.BadImageError as e:
      return e

  what = {"off": "files", "headers": "headers", "decode": "decoding"}[check]
  with concurrent.futures.ThreadPoolExecutor(_CHECK_THREADS) as pool:
    results = list(tqdm.tqdm(pool.map(one, images), total=len(images),
                             desc=f"checking {what} of {os.path.basename(path)}",
                             disable=len(images) < (_TQDM_MIN if check == "off" else 2000)))
  kept, dropped, problems = [], set(), source_lib.Problems()
  for entry, result in zip(images, results):
    if isinstance(result, source_lib.BadImageError):
      problems.add(result.kind, str(result))
      dropped.add(entry["id"])
    else:
      kept.append((entry["id"], entry["file_name"], *result))
  return kept, dropped, problems


def _check_box(bbox: Any, h: int, w: int, clip: bool
               ) -> tuple[str, str] | tuple[None, list[float]]:
  """(problem kind, detail) for a bad COCO bbox, else (None, xyxy clipped to the image).

  A box crossing the border by more than BOX_TOLERANCE is a problem unless `clip`; a box with
  nothing inside the image always is.
  """
  if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(map(_is_number, bbox))):
    return "malformed bbox", f"bbox must be 4 numbers [x, y, width, height], got {_short(bbox)}"
  x, y, bw, bh = map(float, bbox)
  if not all(map(math.isfinite, (x, y, bw, bh))):
    return "non-finite bbox", f"bbox {bbox} has a NaN or infinite value"
  if bw <= 0 or bh <= 0:
    return "empty bbox", f"bbox {bbox} has width or height <= 0"
  x1, y1 = max(x, 0.0), max(y, 0.0)
  x2, y2 = min(x + bw, float(w)), min(y + bh, float(h))
  if x2 <= x1 or y2 <= y1:
    return "bbox outside image", f"bbox {bbox} has no area inside the {w}x{h} (w x h) image"
  if not clip and crosses_border(x, y, bw, bh, h, w):
    return "bbox crosses the border", (f"bbox {bbox} extends outside the {w}x{h} (w x h) image "
                                       f"by more than {BOX_TOLERANCE:g} px")
  return None, [x1, y1, x2, y2]


def crosses_border(x: float, y: float, bw: float, bh: float, h: int, w: int) -> bool:
  """Whether a COCO box [x, y, bw, bh] leaves the h x w image by more than BOX_TOLERANCE."""
  return (x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + bw > w + BOX_TOLERANCE
          or y + bh > h + BOX_TOLERANCE)


def _check_annotation(ann: Any, index_of: dict[int, int], label_of: dict[int, int],
                      images: list[tuple[int, str, int, int]], clip: bool) -> tuple[Any, Any]:
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
  kind, detail = _check_box(ann.get("bbox"), h, w, clip)
  if kind is not None:
    return kind, detail
  x1, y1, x2, y2 = detail
  area = ann.get("area")
  area = float(area) if _is_number(area) and area > 0 else (x2 - x1) * (y2 - y1)
  return None, (index, label_of[category_id], x1, y1, x2, y2, bool(ann.get("iscrowd", 0)), area)


@dataclasses.dataclass(frozen=True)
class CocoScan:
  """What reading a COCO json found: the good part as a table, and the problems of the rest.

  Attributes:
    table: the images whose files passed the check, with their good annotations.
    num_images, num_annotations: entries in the json.
    image_problems, annotation_problems: counted per kind with examples (source.Problems).
  """
  table: CocoTable
  num_images: int
  num_annotations: int
  image_problems: source_lib.Problems
  annotation_problems: source_lib.Problems

  def image_report(self) -> str:
    return (f"{self.image_problems.total} of the {self.num_images} images of "
            f"{self.table.ann_path} cannot be used:\n{self.image_problems.summary()}")

  def annotation_report(self) -> str:
    return (f"{self.annotation_problems.total} of the {self.num_annotations} annotations of "
            f"{self.table.ann_path} are bad:\n{self.annotation_problems.summary()}")


def scan_coco(ann_path: str, image_dir: str, clip: bool = False,
              check: str = "headers") -> CocoScan:
  """Reads a COCO instances json, checks its image files and every annotation, and collects
  every problem instead of stopping at the first (read_coco applies the policies).

  Args:
    ann_path: the instances json.
    image_dir: the folder the json's `file_name`s are relative to.
    clip: clip boxes crossing the border by more than BOX_TOLERANCE instead of counting them
      as problems (on_bad_annotation="skip").
    check: how the image files are checked: "headers" (existence, header, end marker, size and
      EXIF orientation against the json; fast), "decode" (also decode every image), "off"
      (existence only).
  Raises:
    FileNotFoundError, ValueError: naming the file, for an unusable json or image folder.
  """
  if check not in CHECKS:
    raise ValueError(f"config.data.check must be one of {CHECKS}, got {check!r}")
  ann_path, image_dir = os.fspath(ann_path), os.fspath(image_dir)
  if not os.path.isdir(image_dir):
    raise FileNotFoundError(f"Image folder {image_dir} (for {ann_path}) does not exist")
  data = load_json(ann_path)
  class_names, category_ids = _read_categories(ann_path, data["categories"])
  label_of = {c: label for label, c in enumerate(category_ids)}
  images, dropped, image_problems = _read_images(ann_path, image_dir, data["images"], check)
  index_of = {image_id: i for i, (image_id, _, _, _) in enumerate(images)}

  rows, problems, clipped = [], source_lib.Problems(), 0
  annotations = data.get("annotations", [])
  for k, ann in enumerate(tqdm.tqdm(annotations, desc=f"boxes of {os.path.basename(ann_path)}",
                                    disable=len(annotations) < _TQDM_MIN)):
    image_id = ann.get("image_id") if isinstance(ann, dict) else None
    if _is_int(image_id) and image_id in dropped:
      continue  # Counted with its image.
    kind, detail = _check_annotation(ann, index_of, label_of, images, clip)
    if kind is None:
      rows.append(detail)
      if clip:
        _, _, h, w = images[detail[0]]
        clipped += crosses_border(*map(float, ann["bbox"]), h, w)
      continue
    where = (f"annotation {_short(ann.get('id', f'#{k}'))} (image id "
             f"{_short(ann.get('image_id'))})" if isinstance(ann, dict) else f"annotations[{k}]")
    problems.add(kind, f"{where}: {detail}")

  table = np.array(sorted(rows, key=lambda r: r[0]), dtype=np.float64).reshape(-1, 8)
  box_image = table[:, 0].astype(np.int64)
  table = CocoTable(
      ann_path=ann_path, image_dir=image_dir, class_names=class_names,
      category_ids=category_ids,
      image_ids=np.array([i[0] for i in images], np.int64),
      sizes=np.array([(i[2], i[3]) for i in images], np.int32).reshape(-1, 2),
      file_names=tuple(i[1] for i in images),
      box_start=np.concatenate([[0], np.cumsum(np.bincount(box_image, minlength=len(images)))]),
      boxes=table[:, 2:6], labels=table[:, 1].astype(np.int32),
      is_crowd=table[:, 6].astype(bool), areas=table[:, 7], num_clipped=clipped)
  return CocoScan(table, len(data["images"]), len(annotations), image_problems, problems)


def read_coco(ann_path: str, image_dir: str, on_bad_annotation: str = "error",
              on_bad_image: str = "skip", check: str = "headers") -> CocoTable:
  """Reads and validates a COCO instances json and checks its image files (scan_coco), then
  applies the policies to what it found (module docstring).

  Args:
    ann_path, image_dir, check: as scan_coco's.
    on_bad_annotation, on_bad_image: "error" or "skip".
  Returns:
    The validated table.
  Raises:
    FileNotFoundError, ValueError: naming the file, for an unusable json.
    DataError: listing every bad image (under on_bad_image="error") or every bad annotation
      (under on_bad_annotation="error"), counted per kind.
  """
  _check_policy("on_bad_annotation", on_bad_annotation)
  _check_policy("on_bad_image", on_bad_image)
  scan = scan_coco(ann_path, image_dir, clip=on_bad_annotation == "skip", check=check)
  stops = stopping_problems(scan, on_bad_image, on_bad_annotation)
  errors = []
  if scan.image_problems:
    if "image" in stops:
      errors.append(f"{scan.image_report()}\nFix or remove them, or set "
                    "config.data.on_bad_image='skip' to leave them out.")
    else:
      logging.warning("%s\nLeft out (on_bad_image='skip').", scan.image_report())
  if scan.annotation_problems:
    if "annotation" in stops:
      errors.append(f"{scan.annotation_report()}\nFix them, or set "
                    "config.data.on_bad_annotation='skip' to drop them (and clip boxes that "
                    "cross the image border).")
    else:
      logging.warning("%s\nDropped (on_bad_annotation='skip').", scan.annotation_report())
  if errors:
    raise source_lib.DataError("\n".join(errors))
  if not len(scan.table.image_ids):
    raise source_lib.DataError(f"{ann_path}: none of its {scan.num_images} images can be used")
  if scan.table.num_clipped:
    logging.warning("%s: clipped %d boxes that crossed the image border by more than %g px "
                    "(on_bad_annotation='skip')", ann_path, scan.table.num_clipped,
                    BOX_TOLERANCE)
  return scan.table


class CocoSource(source_lib.DetectionSource):
  """A validated COCO folder as a `DetectionSource`."""

  def __init__(self, ann_path: str, image_dir: str, on_bad_annotation: str = "error",
               on_bad_image: str = "skip", check: str = "headers"):
    self.table = read_coco(ann_path, image_dir, on_bad_annotation, on_bad_image, check)
    t = self.table
    self.ann_path = t.ann_path
    self.class_names = t.class_names
    self.category_ids = t.category_ids
    self.image_sizes = t.sizes
    box_image = np.repeat(np.arange(len(t.image_ids)), np.diff(t.box_start))
    self.num_boxes = np.bincount(box_image[~t.is_crowd], minlength=len(t.image_ids))

  @classmethod
  def from_config(cls, data, split: str) -> "CocoSource":
    """Split "train" or "eval" of `config.data`: its {split}_ann and {split}_images, else the
    split `coco_root` holds (layout.py)."""
    paths = layout.coco_split(data, split)
    if paths is None:
      raise ValueError(
          f"No {split} split: set config.data.coco_root to a COCO-format folder (layouts in "
          f"sparse_rcnn_jax/data/layout.py), or config.data.{split}_ann and "
          f"config.data.{split}_images to an instances json and its image folder")
    return cls(*paths, data.on_bad_annotation, data.on_bad_image, data.get("check", "headers"))

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
