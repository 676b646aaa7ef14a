"""What every dataset source provides: decoded examples, class names and COCO ground truth.

A source (a COCO folder in `coco.py`, a TFDS split in `tfds.py`) is random access: `len(source)`
images, `source.example(i)` decodes image i with its boxes. The rest of the pipeline (planning,
augmentation, batching) only talks to this interface.

Conventions: images are uint8 RGB [H, W, 3] in the displayed orientation (EXIF applied); boxes are
absolute xyxy float32 in the pixels of that image; labels are contiguous 0..C-1 (category ids are
sorted and numbered; `category_ids` maps back for evaluation). Crowd boxes never appear in
an `Example` (training drops them) but stay in `coco_gt()` (evaluation ignores matches to them).
"""
import abc
import collections
import dataclasses
import io
import os
from typing import Any, Iterable, Sequence
import unicodedata

import numpy as np
from PIL import Image, ImageOps

from sparse_rcnn_jax.data import info as info_lib

EXIF_ORIENTATION = 0x0112
# EXIF orientations 5..8 rotate by 90 degrees: the displayed image has width and height swapped.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


class BadImageError(Exception):
  """An image file that cannot be read or decoded, or whose size disagrees with its annotations.

  Attributes:
    kind: the kind of problem (one of IMAGE_PROBLEMS), for counting.
  """

  def __init__(self, message: str, kind: str = "cannot decode"):
    super().__init__(message)
    self.kind = kind


# The kinds of bad image, as BadImageError.kind and in check reports.
IMAGE_PROBLEMS = ("missing file", "empty file", "unreadable header", "truncated file",
                  "size differs from the json", "EXIF-rotated, annotated in stored pixels",
                  "cannot decode")


class DataError(ValueError):
  """The dataset cannot be used as configured; the message lists every problem found."""


class Problems:
  """Problems found in a dataset, counted per kind with the first few examples of each.

  Usage: `problems.add(kind, detail)` while scanning, then `problems.summary()` once.
  """

  def __init__(self, examples: int = 3):
    self.examples = examples
    self.counts: collections.Counter[str] = collections.Counter()
    self.first: dict[str, list[str]] = collections.defaultdict(list)

  def add(self, kind: str, detail: str) -> None:
    self.counts[kind] += 1
    if len(self.first[kind]) < self.examples:
      self.first[kind].append(detail)

  def __bool__(self) -> bool:
    return bool(self.counts)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def summary(self) -> str:
    """One line per kind, most frequent first: count, kind and the first examples."""
    lines = []
    for kind, count in self.counts.most_common():
      more = count - len(self.first[kind])
      examples = "\n      ".join(self.first[kind]) + (f"\n      ... and {more} more"
                                                       if more else "")
      lines.append(f"  {count} x {kind}, e.g.\n      {examples}")
    return "\n".join(lines)


def empty_training_split(split: str, num_boxes: int, num_images: int, what: str,
                         allowed: bool) -> str | None:
  """The one rule for a training split without any box: what to say, or None when `split` is
  not "train", it has boxes, or empty training splits are `allowed`
  (config.data.allow_empty_train). `what` names the split (its annotation file)."""
  if split != "train" or num_boxes or allowed:
    return None
  return (f"The training split {what} has no boxes (no 'annotations', an empty list, or all of "
          f"them crowd or dropped) in its {num_images} images: a detector would learn to find "
          "nothing. Set config.data.allow_empty_train=True if that is intended.")


@dataclasses.dataclass(frozen=True)
class Example:
  """One decoded image and its non-crowd ground truth.

  Attributes:
    image: uint8 [H, W, 3] RGB, displayed orientation.
    boxes: float32 [n, 4] absolute xyxy in `image` pixels.
    labels: int32 [n] contiguous labels 0..C-1.
    image_id: the dataset's image id.
    orig_size: (h, w) of the image as decoded, kept through resizing and cropping.
  """
  image: np.ndarray
  boxes: np.ndarray
  labels: np.ndarray
  image_id: int
  orig_size: tuple[int, int]


class DetectionSource(abc.ABC):
  """Random-access detection dataset.

  Attributes:
    class_names: C names, index = contiguous label.
    category_ids: C original dataset category ids, index = contiguous label.
    image_sizes: int [N, 2] (h, w) of each displayed image, or None when only decoding tells
      (then batches cannot be grouped by aspect ratio ahead of time).
    num_boxes: int [N] non-crowd boxes per image, or None when unknown without reading.
  """
  class_names: tuple[str, ...]
  category_ids: tuple[int, ...]
  image_sizes: np.ndarray | None
  num_boxes: np.ndarray | None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def info(self) -> info_lib.DatasetInfo:
    """The classes and category ids, as the rest of the program takes them."""
    return info_lib.DatasetInfo(tuple(self.class_names), tuple(self.category_ids))

  @abc.abstractmethod
  def __len__(self) -> int:
    """Number of images."""

  @abc.abstractmethod
  def example(self, index: int) -> Example:
    """Decodes image `index` (0..len-1); raises BadImageError naming the file when it cannot."""

  @abc.abstractmethod
  def coco_gt(self) -> dict[str, Any]:
    """COCO-format ground truth for pycocotools, crowd boxes kept, original category ids."""


def _to_rgb(img: Image.Image) -> np.ndarray:
  """Any PIL mode -> uint8 [H, W, 3] RGB.

  16-bit and 32-bit grey levels are scaled from 0..65535 to 0..255 (PIL's own conversion would
  clip them at 255, turning most of a 16-bit image white); alpha is dropped; palettes, CMYK and
  greyscale go through PIL's conversions.
  """
  if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
    grey = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or grey.max(initial=0) > 255:
      grey = grey * (255.0 / 65535.0)
    grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)
  if img.mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")
  return np.asarray(img.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes | str | os.PathLike, name: str | None = None,
                 expected_size: tuple[int, int] | None = None) -> np.ndarray:
  """Decodes an image file or its bytes into uint8 [H, W, 3] RGB, EXIF orientation applied.

  Args:
    data: a path, or the encoded bytes.
    name: what to call the image in errors (defaults to the path).
    expected_size: (h, w) the annotations were made on; a different decoded size is an error,
      since the boxes would not fit the pixels.
  Raises:
    BadImageError: naming the image, for a missing, corrupt or truncated file, an unsupported
      format, or a size mismatch.
  """
  name = name or (os.fspath(data) if not isinstance(data, bytes) else "<image bytes>")
  try:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
      rgb = _to_rgb(ImageOps.exif_transpose(img))
  except Exception as e:  # pylint: disable=broad-except
    # Any failure to turn a user's file into pixels is a bad image, never a crash mid-epoch.
    raise BadImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})",
                        "cannot decode") from e
  if expected_size is not None and tuple(rgb.shape[:2]) != tuple(expected_size):
    raise BadImageError(
        f"{name}: decoded image (EXIF orientation applied) is {rgb.shape[1]}x{rgb.shape[0]} "
        f"(w x h) but the annotations say {expected_size[1]}x{expected_size[0]}",
        "size differs from the json")
  return rgb


def _orientation(img: Image.Image) -> int | None:
  """The EXIF orientation tag of an opened image, from its header alone.

  PIL's getexif() decodes a whole PNG to look for an eXIf chunk after the pixels; for PNG only
  the chunk before them (where writers put it) is read.
  """
  if img.format != "PNG":
    return img.getexif().get(EXIF_ORIENTATION)
  if "exif" not in img.info:
    return None
  exif = Image.Exif()
  exif.load(img.info["exif"])
  return exif.get(EXIF_ORIENTATION)


def image_size(data: bytes | str | os.PathLike) -> tuple[int, int]:
  """(h, w) of the displayed image from its header alone (no pixel decoding)."""
  with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
    w, h = img.size
    if _orientation(img) in _TRANSPOSING_ORIENTATIONS:
      w, h = h, w
  return h, w


# A JPEG ends with the EOI marker, a PNG with its IEND chunk; a file cut short lacks them. Some
# writers append a few bytes after the end, so the marker is looked for near the end.
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}
_TAIL_BYTES = 1024


def missing_file_hint(image_dir: str, file_name: str) -> str:
  """A hint for a file that does not exist: the same name in another Unicode normalization
  (macOS and some archivers write NFD names, most json writers NFC), else ""."""
  for form in ("NFC", "NFD", "NFKC", "NFKD"):
    other = unicodedata.normalize(form, file_name)
    if other != file_name and os.path.exists(os.path.join(image_dir, other)):
      return (f" (a file whose name differs only in Unicode normalization exists: {other!r} is "
              f"{form}; rename the file or the json's file_name so the two agree)")
  return ""


def read_header(path: str, expected_size: tuple[int, int] | None = None,
                decode: bool = False) -> tuple[int, int]:
  """Checks an image file from its header, without decoding pixels unless `decode`.

  Finds a missing or empty file, an unreadable header, a JPEG or PNG cut short, and a size
  (EXIF orientation applied) that differs from `expected_size` (h, w), telling apart the photo
  whose annotations were made on the stored, unrotated pixels.
  Returns:
    (h, w) of the displayed image.
  Raises:
    BadImageError: naming the file, with its `kind`.
  """
  if not os.path.isfile(path):
    hint = missing_file_hint(os.path.dirname(path), os.path.basename(path))
    raise BadImageError(f"{path}: image file does not exist{hint}", "missing file")
  size = os.path.getsize(path)
  if not size:
    raise BadImageError(f"{path}: image file is empty (0 bytes)", "empty file")
  try:
    with Image.open(path) as img:
      stored_w, stored_h = img.size
      image_format = img.format
      marker = _END_MARKERS.get(image_format)
      if marker is not None:
        with open(path, "rb") as f:
          f.seek(max(0, size - _TAIL_BYTES))
          truncated = marker not in f.read()
        if truncated:
          raise BadImageError(f"{path}: {image_format} file is truncated ({size} bytes, no "
                              "end marker)", "truncated file")
      orientation = _orientation(img)
  except BadImageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise BadImageError(f"{path}: cannot read the image header ({type(e).__name__}: {e})",
                        "unreadable header") from e
  h, w = ((stored_w, stored_h) if orientation in _TRANSPOSING_ORIENTATIONS
          else (stored_h, stored_w))
  if expected_size is not None and (h, w) != tuple(expected_size):
    eh, ew = expected_size
    if (stored_h, stored_w) == (eh, ew):
      raise BadImageError(
          f"{path}: EXIF orientation {orientation} displays the stored {stored_w}x{stored_h} "
          f"(w x h) image as {w}x{h}, but the json says {ew}x{eh}: its boxes were drawn on the "
          "stored pixels. Re-annotate the displayed image, or write the rotation into the "
          "pixels and drop the EXIF tag", "EXIF-rotated, annotated in stored pixels")
    raise BadImageError(f"{path}: the image is {w}x{h} (w x h, EXIF orientation applied) but "
                        f"the json says {ew}x{eh}", "size differs from the json")
  if decode:
    decode_image(path, expected_size=(h, w))
  return h, w


def build_coco_gt(class_names: Sequence[str], category_ids: Sequence[int],
                  images: Iterable[tuple[int, int, int]],
                  annotations: Iterable[tuple[int, int, int, Sequence[float], float, bool]]
                  ) -> dict[str, Any]:
  """A minimal COCO ground-truth dict, enough for pycocotools' bbox evaluation.

  Args:
    class_names, category_ids: per contiguous label.
    images: (image_id, h, w) per image.
    annotations: (annotation_id, image_id, label, xyxy box, area, is_crowd) per box.
  """
  return {
      "images": [{"id": int(i), "height": int(h), "width": int(w)} for i, h, w in images],
      "annotations": [{
          "id": int(ann_id), "image_id": int(image_id),
          "category_id": int(category_ids[label]),
          "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
          "area": float(area), "iscrowd": int(bool(crowd))}
                      for ann_id, image_id, label, box, area, crowd in annotations],
      "categories": [{"id": int(c), "name": n}
                     for n, c in zip(class_names, category_ids)],
  }
