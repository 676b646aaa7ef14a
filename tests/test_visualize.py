"""Tests of the drawing functions, on flat grey images where every drawn pixel shows."""
import numpy as np
import pytest
from PIL import Image

from sparse_rcnn_jax import visualize

GREY = 90


def _grey(height: int = 100, width: int = 120) -> np.ndarray:
  return np.full((height, width, 3), GREY, np.uint8)


def _changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
  """[H, W] bool: pixels whose colour differs."""
  return np.any(before != after, axis=-1)


def test_draw_detections_draws_outlines_with_class_colours_and_respects_threshold():
  image = _grey()
  boxes = np.array([[20, 40, 60, 80], [70, 10, 110, 50], [5, 85, 15, 95]], np.float32)
  scores = np.array([0.9, 0.2, 0.5])
  labels = np.array([0, 1, 3])
  out = visualize.draw_detections(image, boxes, scores, labels, ["a", "b", "c", "d"],
                                  score_threshold=0.3, line_width=1)
  assert out.shape == image.shape and out.dtype == np.uint8
  assert np.all(image == GREY)  # The input is left alone.
  # Box 0 covers pixels 20..59 x 40..79: its edges take the colour of class 0.
  for y, x in [(60, 20), (60, 59), (40, 50), (79, 30)]:
    assert tuple(out[y, x]) == visualize.colour_of(0), (y, x)
  assert tuple(out[90, 5]) == visualize.colour_of(3)
  changed = _changed(image, out)
  assert not changed[45:75, 25:55].any()  # Outline only: the inside stays.
  # Box 1 scores under the threshold: none of its outline is drawn.
  assert not changed[25:45, 70].any() and not changed[49, 75:105].any()
  assert not changed[60:80, 100:].any()  # Far from every box.
  # The tag of box 0 sits above it, in the class colour.
  tag = out[30:40, 20:40]
  assert np.all(tag == visualize.colour_of(0), axis=-1).mean() > 0.3


def test_draw_detections_tag_moves_inside_at_the_top_edge_and_skips_nan():
  image = _grey()
  boxes = np.array([[10, 0, 50, 40], [np.nan, 0, 5, 5]])
  out = visualize.draw_detections(image, boxes, np.array([1.0, 1.0]), np.array([2, 2]))
  changed = _changed(image, out)
  assert changed[2:10, 12:30].any()  # Tag drawn inside the box, below the top edge.
  assert not changed[50:].any()


def test_draw_stages_fades_boxes_by_score_and_keeps_colours_per_proposal():
  image = _grey()
  proposals = np.array([[10, 10, 50, 50], [60, 20, 100, 90]], np.float32)
  stage_1 = proposals + 5
  stage_2 = proposals + 10
  stage_scores = np.array([[1.0, 1.0], [1.0, 0.5], [0.5, 0.1]])
  strip = visualize.draw_stages(image, np.stack([proposals, stage_1, stage_2]), stage_scores,
                                gap=4, titles=["p", "1", "2"])
  assert strip.shape == (100, 3 * 120 + 2 * 4, 3) and strip.dtype == np.uint8
  panels = [strip[:, s * 124:s * 124 + 120] for s in range(3)]
  assert np.all(strip[:, 120:124] == 0)  # The gap.
  assert tuple(panels[0][30, 10]) == visualize.PROPOSAL_COLOUR
  assert tuple(panels[0][50, 60]) == visualize.PROPOSAL_COLOUR
  assert tuple(panels[1][30, 15]) == visualize.colour_of(0)
  # Opacity = score: half the colour of proposal 1 over the grey.
  half = 0.5 * np.array(visualize.colour_of(1)) + 0.5 * GREY
  np.testing.assert_allclose(panels[1][60, 65], half, atol=1.5)
  np.testing.assert_allclose(panels[2][40, 20], 0.5 * np.array(visualize.colour_of(0)) + 0.5 * GREY,
                             atol=1.5)
  # Score 0.1 < the 0.3 threshold: proposal 1 vanishes in stage 2.
  assert not _changed(image, panels[2])[40:95, 70:].any()


def test_draw_stages_without_scores_draws_everything_opaque():
  image = _grey()
  boxes = np.array([[[10, 10, 50, 50]], [[20, 20, 60, 60]]], np.float32)
  strip = visualize.draw_stages(image, boxes, None, gap=0)
  assert strip.shape == (100, 240, 3)
  assert tuple(strip[40, 120 + 20]) == visualize.colour_of(0)


def test_bad_inputs_are_explained():
  with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8"):
    visualize.draw_detections(np.zeros((10, 10, 3), np.float32), np.zeros((0, 4)), [], [])
  with pytest.raises(ValueError, match=r"stage_scores \[S\+1, N\]"):
    visualize.draw_stages(_grey(), np.zeros((3, 2, 4)), np.ones((2, 2)))


def test_save_png_round_trip(tmp_path):
  image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
  path = visualize.save_png(image, tmp_path / "sub" / "x.png")
  np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
