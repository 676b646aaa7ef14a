"""Training augmentation and test resizing: pure NumPy/PIL, boxes moved with the pixels.

The official recipe, with detectron2's semantics (docs/model.md, section 1):
- train: horizontal flip with probability `flip_prob`; then, with probability `crop_prob`
  (the 300-proposal recipe; 0 otherwise), resize the short side to one of `crop_scales` (no
  long-side limit) and crop a random absolute size, each side drawn from
  [crop_size[0], crop_size[1]] and capped by the image; finally resize the short side to one of
  `scales` with the long side at most `max_size`.
- test: the same with a single scale, no flip and no crop.
Boxes are absolute xyxy float32; a crop clips them and removes those left without area.

Randomness enters as NUM_UNIFORMS numbers in [0, 1) per image, drawn by the pipeline from its seed.
`sample_params` turns them and the image size into concrete parameters, elementwise on arrays:
the pipeline predicts every image's output size for a whole epoch without decoding anything (to
put images of one shape in one batch), and the loader calls it again for one image and gets the
same parameters.
"""
import dataclasses

import numpy as np
from PIL import Image

from sparse_rcnn_jax.data import source as source_lib

# flip, crop?, crop scale, crop height, crop width, crop top, crop left, final scale.
NUM_UNIFORMS = 8


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Sizes in pixels; `scales` are short sides, one drawn per image."""
  scales: tuple[int, ...]
  max_size: int
  flip_prob: float = 0.0
  crop_prob: float = 0.0
  crop_scales: tuple[int, ...] = (400, 500, 600)
  crop_size: tuple[int, int] = (384, 600)


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """Augmentation of one image, or of many (every field an array of one shape).

  Attributes:
    flip: horizontal flip first.
    crop: resize to (mid_h, mid_w), then keep rows crop_y0:crop_y0+crop_h and columns
      crop_x0:crop_x0+crop_w. Without a crop, mid = input size and the crop is the whole image.
    out_h, out_w: the final size.
  """
  flip: np.ndarray
  crop: np.ndarray
  mid_h: np.ndarray
  mid_w: np.ndarray
  crop_y0: np.ndarray
  crop_x0: np.ndarray
  crop_h: np.ndarray
  crop_w: np.ndarray
  out_h: np.ndarray
  out_w: np.ndarray


def resized_shape(height, width, short_side, max_size) -> tuple[np.ndarray, np.ndarray]:
  """detectron2's ResizeShortestEdge output (h, w), elementwise.

  The short side becomes `short_side` unless the long side would then exceed `max_size`, in
  which case the long side becomes `max_size`; sizes round half up.
  """
  h, w = np.asarray(height, np.float64), np.asarray(width, np.float64)
  scale = short_side / np.minimum(h, w)
  new_h, new_w = np.where(h < w, short_side, scale * h), np.where(h < w, scale * w, short_side)
  longest = np.maximum(new_h, new_w)
  shrink = np.where(longest > max_size, max_size / longest, 1.0)
  return (new_h * shrink + 0.5).astype(np.int64), (new_w * shrink + 0.5).astype(np.int64)


def _choice(options: tuple[int, ...], u: np.ndarray) -> np.ndarray:
  """options[floor(u * len)], elementwise."""
  return np.asarray(options)[np.minimum((u * len(options)).astype(np.int64), len(options) - 1)]


def _randint(low: np.ndarray, high: np.ndarray, u: np.ndarray) -> np.ndarray:
  """An integer in [low, high] (inclusive) from u in [0, 1), elementwise."""
  return low + np.minimum((u * (high - low + 1)).astype(np.int64), high - low)


def sample_params(height, width, uniforms, config: AugmentConfig) -> AugmentParams:
  """Augmentation parameters from image sizes and uniform numbers.

  Args:
    height, width: input image sizes, any shape S (scalars for one image).
    uniforms: [*S, NUM_UNIFORMS] in [0, 1).
    config: the recipe.
  Returns:
    AugmentParams with fields of shape S.
  """
  h, w = np.asarray(height, np.int64), np.asarray(width, np.int64)
  u = np.asarray(uniforms, np.float64)
  flip = u[..., 0] < config.flip_prob
  crop = u[..., 1] < config.crop_prob
  pre_h, pre_w = resized_shape(h, w, _choice(config.crop_scales, u[..., 2]), np.inf)
  mid_h, mid_w = np.where(crop, pre_h, h), np.where(crop, pre_w, w)
  low, high = config.crop_size
  crop_h = np.where(crop, _randint(np.minimum(mid_h, low), np.minimum(mid_h, high), u[..., 3]),
                    mid_h)
  crop_w = np.where(crop, _randint(np.minimum(mid_w, low), np.minimum(mid_w, high), u[..., 4]),
                    mid_w)
  crop_y0 = _randint(np.zeros_like(crop_h), mid_h - crop_h, u[..., 5])
  crop_x0 = _randint(np.zeros_like(crop_w), mid_w - crop_w, u[..., 6])
  out_h, out_w = resized_shape(crop_h, crop_w, _choice(config.scales, u[..., 7]),
                               config.max_size)
  return AugmentParams(flip=flip, crop=crop, mid_h=mid_h, mid_w=mid_w, crop_y0=crop_y0,
                       crop_x0=crop_x0, crop_h=crop_h, crop_w=crop_w, out_h=out_h, out_w=out_w)


def hflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mirrors image [H, W, C] and xyxy boxes [n, 4] left-right."""
  width = image.shape[1]
  return (np.ascontiguousarray(image[:, ::-1]),
          np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1))


def resize(image: np.ndarray, boxes: np.ndarray, height: int,
           width: int) -> tuple[np.ndarray, np.ndarray]:
  """Bilinear resize (PIL, as detectron2) of uint8 image [H, W, 3] and xyxy boxes [n, 4]."""
  old_h, old_w = image.shape[:2]
  if (old_h, old_w) == (height, width):
    return image, boxes
  resized = np.asarray(Image.fromarray(image).resize((int(width), int(height)), Image.BILINEAR))
  scale = np.array([width / old_w, height / old_h] * 2, np.float32)
  return resized, (boxes * scale).astype(np.float32)


def clip_boxes(boxes: np.ndarray, labels: np.ndarray, height: int,
               width: int) -> tuple[np.ndarray, np.ndarray]:
  """Clips xyxy boxes [n, 4] to the image and removes those left without area (with labels).

  The emptiness threshold (1e-5 pixels) is detectron2's.
  """
  boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
  keep = (boxes[:, 2] - boxes[:, 0] > 1e-5) & (boxes[:, 3] - boxes[:, 1] > 1e-5)
  return boxes[keep], labels[keep]


def crop(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, y0: int, x0: int,
         height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Keeps image[y0:y0+height, x0:x0+width]; boxes shift, clip, and go when emptied."""
  image = image[y0:y0 + height, x0:x0 + width]
  boxes, labels = clip_boxes(boxes - np.array([x0, y0, x0, y0], np.float32), labels, height,
                             width)
  return image, boxes, labels


def augment(example: source_lib.Example, params: AugmentParams) -> source_lib.Example:
  """Applies one image's parameters (scalar fields) to its pixels and boxes."""
  image, boxes, labels = example.image, example.boxes, example.labels
  if params.flip:
    image, boxes = hflip(image, boxes)
  if params.crop:
    image, boxes = resize(image, boxes, params.mid_h, params.mid_w)
    image, boxes, labels = crop(image, boxes, labels, params.crop_y0, params.crop_x0,
                                params.crop_h, params.crop_w)
  image, boxes = resize(image, boxes, params.out_h, params.out_w)
  return dataclasses.replace(example, image=image, boxes=boxes, labels=labels)
