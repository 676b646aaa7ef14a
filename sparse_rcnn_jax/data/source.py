"""What every dataset source provides: decoded examples, class names and COCO ground truth.

A source (a COCO folder in `coco.py`, a TFDS split in `tfds.py`) is random access: `len(source)`
images, `source.example(i)` decodes image i with its boxes. The rest of the pipeline (planning,
augmentation, batching) only talks to this interface.

Conventions: images are uint8 RGB [H, W, 3] in the displayed orientation (EXIF applied); boxes are
absolute xyxy float32 in the pixels of that image; labels are contiguous 0..C-1 (category ids are
sorted and numbered; `label_to_category_id` maps back for evaluation). Crowd boxes never appear in
an `Example` (training drops them) but stay in `coco_gt()` (evaluation ignores matches to them).
"""
import abc
import dataclasses
import io
import os
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps

from sparse_rcnn_jax.data import info as info_lib

EXIF_ORIENTATION = 0x0112
# EXIF orientations 5..8 rotate by 90 degrees: the displayed image has width and height swapped.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


class BadImageError(Exception):
  """An image file that cannot be read or decoded, or whose size disagrees with its annotations."""


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
    label_to_category_id: C original dataset category ids, index = contiguous label.
    image_sizes: int [N, 2] (h, w) of each displayed image, or None when only decoding tells
      (then batches cannot be grouped by aspect ratio ahead of time).
    num_boxes: int [N] non-crowd boxes per image, or None when unknown without reading.
  """
  class_names: tuple[str, ...]
  label_to_category_id: tuple[int, ...]
  image_sizes: np.ndarray | None
  num_boxes: np.ndarray | None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def info(self) -> info_lib.DatasetInfo:
    """The classes and category ids, as the rest of the program takes them."""
    return info_lib.DatasetInfo(tuple(self.class_names), tuple(self.label_to_category_id))

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
    raise BadImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e
  if expected_size is not None and tuple(rgb.shape[:2]) != tuple(expected_size):
    raise BadImageError(
        f"{name}: decoded image (EXIF orientation applied) is {rgb.shape[1]}x{rgb.shape[0]} "
        f"(w x h) but the annotations say {expected_size[1]}x{expected_size[0]}")
  return rgb


def image_size(data: bytes | str | os.PathLike) -> tuple[int, int]:
  """(h, w) of the displayed image from its header alone (no pixel decoding)."""
  with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
    w, h = img.size
    if img.getexif().get(EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS:
      w, h = h, w
  return h, w


def build_coco_gt(class_names: Sequence[str], label_to_category_id: Sequence[int],
                  images: Iterable[tuple[int, int, int]],
                  annotations: Iterable[tuple[int, int, int, Sequence[float], float, bool]]
                  ) -> dict[str, Any]:
  """A minimal COCO ground-truth dict, enough for pycocotools' bbox evaluation.

  Args:
    class_names, label_to_category_id: per contiguous label.
    images: (image_id, h, w) per image.
    annotations: (annotation_id, image_id, label, xyxy box, area, is_crowd) per box.
  """
  return {
      "images": [{"id": int(i), "height": int(h), "width": int(w)} for i, h, w in images],
      "annotations": [{
          "id": int(ann_id), "image_id": int(image_id),
          "category_id": int(label_to_category_id[label]),
          "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
          "area": float(area), "iscrowd": int(bool(crowd))}
                      for ann_id, image_id, label, box, area, crowd in annotations],
      "categories": [{"id": int(c), "name": n}
                     for n, c in zip(class_names, label_to_category_id)],
  }
