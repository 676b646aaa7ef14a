"""Augmentation: detectron2's resize rule, parameter ranges, and boxes that follow the pixels."""
import dataclasses

import numpy as np
import pytest

from sparse_rcnn_jax.data import source as source_lib
from sparse_rcnn_jax.data import transforms


def detectron2_resized_shape(h, w, short, max_size):
  """detectron2's ResizeShortestEdge.get_output_shape, verbatim in scalar Python."""
  scale = short * 1.0 / min(h, w)
  if h < w:
    newh, neww = short, scale * w
  else:
    newh, neww = scale * h, short
  if max(newh, neww) > max_size:
    scale = max_size * 1.0 / max(newh, neww)
    newh, neww = newh * scale, neww * scale
  return int(newh + 0.5), int(neww + 0.5)


def test_resized_shape_matches_detectron2():
  rng = np.random.default_rng(0)
  h, w = rng.integers(1, 3000, 500), rng.integers(1, 3000, 500)
  short = rng.choice([480, 800, 13], 500)
  for max_size in (1333, np.inf):
    new_h, new_w = transforms.resized_shape(h, w, short, max_size)
    expected = [detectron2_resized_shape(*args, max_size) for args in zip(h, w, short)]
    np.testing.assert_array_equal(np.stack([new_h, new_w], 1), expected)
  assert transforms.resized_shape(480, 640, 800, 1333) == (800, 1067)
  assert transforms.resized_shape(100, 1000, 800, 1333) == (133, 1333)


CROP_RECIPE = transforms.AugmentConfig(scales=tuple(range(480, 801, 32)), max_size=1333,
                                       flip_prob=0.5, crop_prob=0.5)


def test_sampled_parameters_follow_the_recipe():
  rng = np.random.default_rng(1)
  n = 4000
  h, w = rng.integers(200, 1200, n), rng.integers(200, 1200, n)
  p = transforms.sample_params(h, w, rng.random((n, transforms.NUM_UNIFORMS)), CROP_RECIPE)
  assert 0.45 < p.flip.mean() < 0.55 and 0.45 < p.crop.mean() < 0.55
  c = p.crop
  mid_short = np.minimum(p.mid_h, p.mid_w)[c]
  assert set(mid_short) <= {400, 500, 600} and len(set(mid_short)) == 3
  for size, mid in ((p.crop_h, p.mid_h), (p.crop_w, p.mid_w)):
    assert (size[c] >= np.minimum(mid[c], 384)).all() and (size[c] <= np.minimum(mid[c], 600)).all()
    assert (size[~c] == mid[~c]).all()
  assert (p.crop_y0 >= 0).all() and (p.crop_y0 + p.crop_h <= p.mid_h).all()
  assert (p.crop_x0 >= 0).all() and (p.crop_x0 + p.crop_w <= p.mid_w).all()
  assert ((p.mid_h == h) & (p.mid_w == w))[~c].all() and (p.crop_y0[~c] == 0).all()
  short, long = np.minimum(p.out_h, p.out_w), np.maximum(p.out_h, p.out_w)
  assert (np.isin(short, CROP_RECIPE.scales) | (long == 1333)).all() and (long <= 1333).all()
  assert set(short[long < 1333]) == set(CROP_RECIPE.scales)


def test_one_image_gets_the_parameters_planned_for_it_among_many():
  rng = np.random.default_rng(2)
  h, w, u = rng.integers(50, 900, 20), rng.integers(50, 900, 20), rng.random((20, 8))
  many = transforms.sample_params(h, w, u, CROP_RECIPE)
  for i in range(20):
    one = transforms.sample_params(h[i], w[i], u[i], CROP_RECIPE)
    for field in dataclasses.fields(transforms.AugmentParams):
      assert getattr(one, field.name) == getattr(many, field.name)[i], field.name


def _example(boxes, labels=None, shape=(90, 130)):
  image = np.zeros((*shape, 3), np.uint8)
  for x1, y1, x2, y2 in boxes:
    image[y1:y2, x1:x2] = 255
  boxes = np.array(boxes, np.float32).reshape(-1, 4)
  labels = np.arange(len(boxes), dtype=np.int32) if labels is None else np.array(labels, np.int32)
  return source_lib.Example(image=image, boxes=boxes, labels=labels, image_id=1,
                            orig_size=shape)


def test_flip_twice_is_identity():
  ex = _example([(10, 20, 50, 41), (0, 0, 130, 5)])
  ex.image[..., 1] = np.arange(130, dtype=np.uint8)  # Asymmetric content.
  image, boxes = transforms.hflip(*transforms.hflip(ex.image, ex.boxes))
  np.testing.assert_array_equal(image, ex.image)
  np.testing.assert_array_equal(boxes, ex.boxes)
  _, flipped = transforms.hflip(ex.image, ex.boxes)
  np.testing.assert_array_equal(flipped, [[80, 20, 120, 41], [0, 0, 130, 5]])


def _pixel_box(image):
  """xyxy bounds of the bright pixels (a pixel k covers [k, k + 1))."""
  ys, xs = np.nonzero(image[..., 0] > 127)
  return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) if len(xs) else None


@pytest.mark.parametrize("seed", range(40))
def test_boxes_stay_on_their_pixels(seed):
  """A box drawn as a filled rectangle still bounds it after flip, resize and crop."""
  rng = np.random.default_rng(seed)
  x1, y1 = rng.integers(0, 100), rng.integers(0, 60)
  ex = _example([(x1, y1, x1 + rng.integers(5, 30), y1 + rng.integers(5, 30))])
  config = transforms.AugmentConfig(scales=(48, 64, 80), max_size=120, flip_prob=0.5,
                                    crop_prob=0.7, crop_scales=(60, 90), crop_size=(30, 70))
  params = transforms.sample_params(90, 130, rng.random(transforms.NUM_UNIFORMS), config)
  out = transforms.augment(ex, params)
  assert out.image.shape == (params.out_h, params.out_w, 3)
  pixels = _pixel_box(out.image)
  if not len(out.boxes):
    assert pixels is None  # The crop missed the rectangle.
  else:
    assert pixels is not None and out.labels.tolist() == [0]
    np.testing.assert_allclose(out.boxes[0], pixels, atol=1.0)


def test_crop_removes_emptied_boxes_with_their_labels():
  ex = _example([(5, 5, 20, 20), (60, 40, 100, 80), (30, 10, 62, 30)], labels=[4, 7, 9])
  image, boxes, labels = transforms.crop(ex.image, ex.boxes, ex.labels, y0=25, x0=40,
                                         height=50, width=70)
  assert image.shape == (50, 70, 3)
  assert labels.tolist() == [7, 9]
  np.testing.assert_array_equal(boxes, [[20, 15, 60, 50], [0, 0, 22, 5]])


def test_resize_scales_boxes_and_leaves_same_size_alone():
  ex = _example([(10, 20, 50, 40)])
  image, boxes = transforms.resize(ex.image, ex.boxes, 45, 260)
  assert image.shape == (45, 260, 3)
  np.testing.assert_allclose(boxes, [[20, 10, 100, 20]])
  same, same_boxes = transforms.resize(ex.image, ex.boxes, 90, 130)
  assert same is ex.image and same_boxes is ex.boxes
