"""Tests of the drawing functions, on flat grey images where every drawn pixel shows."""
import numpy as np
import pytest
from PIL import Image

from sparse_rcnn_jax.evaluation import visualize

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
                                  score_threshold=0.3, min_side=None, line_width=1)
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
  out = visualize.draw_detections(image, boxes, np.array([1.0, 1.0]), np.array([2, 2]),
                                  min_side=None)
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
                                gap=4, titles=["p", "1", "2"], min_side=None, line_width=1)
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
  strip = visualize.draw_stages(image, boxes, None, gap=0, min_side=None)
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


def test_upscale_factor_is_whole_reaches_the_short_side_and_never_shrinks():
  assert visualize.upscale_factor(64, 96) == 8  # 480 / 64 = 7.5, rounded up.
  assert visualize.upscale_factor(160, 160) == 3
  assert visualize.upscale_factor(479, 1000) == 2
  assert visualize.upscale_factor(480, 640) == 1 and visualize.upscale_factor(900, 700) == 1
  assert visualize.upscale_factor(64, 96, None) == 1 and visualize.upscale_factor(64, 96, 0) == 1


def test_a_small_image_is_enlarged_in_blocks_with_its_boxes():
  image = _grey(64, 96)
  image[5, 7] = (255, 0, 0)
  out = visualize.draw_detections(image, np.array([[10, 20, 40, 50]]), np.array([0.9]),
                                  np.array([2]), ["a", "b", "c"])
  assert out.shape == (512, 768, 3)  # Factor 8: short side >= 480.
  assert np.all(out[40:48, 56:64] == (255, 0, 0))  # Nearest: one pixel, one 8 x 8 block.
  assert tuple(out[39, 60]) == tuple(out[48, 60]) == (GREY,) * 3
  # The box covers original pixels 10..39 x 20..49, so 80..319 x 160..399 here, outlined
  # 3 px wide (a 480 px short side's width) inside that range.
  colour = visualize.colour_of(2)
  for y, x in [(300, 80), (300, 82), (300, 319), (300, 317), (160, 200), (399, 200)]:
    assert tuple(out[y, x]) == colour, (y, x)
  for y, x in [(300, 79), (300, 83), (300, 320), (300, 316), (159, 200), (163, 200), (400, 200)]:
    assert tuple(out[y, x]) == (GREY,) * 3, (y, x)
  assert not _changed(np.full_like(out, GREY), out)[:40].any()  # No banner: 0.9 >= 0.3.


def test_a_large_image_keeps_its_size_and_the_strip_enlarges_every_panel():
  image = _grey(500, 600)
  out = visualize.draw_detections(image, np.array([[100, 100, 200, 200]]), np.array([0.9]),
                                  np.array([0]))
  assert out.shape == image.shape
  assert tuple(out[150, 100]) == visualize.colour_of(0)
  strip = visualize.draw_stages(_grey(64, 96), np.zeros((3, 2, 4)) + [10, 10, 20, 20],
                                gap=4)
  assert strip.shape == (512, 3 * 768 + 2 * 4, 3)


def test_shown_boxes_are_those_above_the_threshold_or_else_the_few_best_finite_ones():
  scores = np.array([0.1, 0.5, 0.25, 0.9, 0.2])
  finite = np.array([True, True, True, False, True])
  shown, below = visualize.shown_boxes(scores, finite, 0.3)
  assert shown.tolist() == [1] and not below  # Box 3 cannot be drawn.
  shown, below = visualize.shown_boxes(scores, finite, 0.6, num_below=3)
  assert shown.tolist() == [4, 2, 1] and below  # Lowest first: the best on top.
  shown, below = visualize.shown_boxes(scores, finite, 0.6, num_below=10)
  assert shown.tolist() == [0, 4, 2, 1] and below
  shown, below = visualize.shown_boxes(np.zeros(0), np.zeros(0, bool), 0.3)
  assert shown.tolist() == [] and below


def _banner_is_drawn(out: np.ndarray) -> bool:
  """A translucent black band across the top of a grey picture: most top rows darker."""
  return np.mean(out[:8] < GREY) > 0.7


def test_nothing_above_the_threshold_shows_a_banner_and_the_three_best_dashed():
  image = _grey(64, 96)
  boxes = np.array([[10, 20, 30, 40], [40, 20, 60, 40], [70, 20, 90, 40], [10, 45, 30, 60],
                    [40, 45, 60, 60]], np.float32)
  scores = np.array([0.1, 0.25, 0.05, 0.2, 0.15])
  labels = np.arange(5)
  out = visualize.draw_detections(image, boxes, scores, labels, score_threshold=0.3)
  assert _banner_is_drawn(out) and not _banner_is_drawn(visualize.draw_detections(
      image, boxes, scores + 0.5, labels, score_threshold=0.3))
  drawn = [k for k in range(5) if np.all(out == visualize.colour_of(k), axis=-1).any()]
  assert drawn == [1, 3, 4]  # The three best.
  # Dashed: the top edge of box 1 (x 320..479 at y 160) alternates colour and grey.
  top_edge = np.all(out[160, 320:480] == visualize.colour_of(1), axis=-1)
  assert 0.3 < top_edge.mean() < 0.7
  assert _banner_is_drawn(visualize.draw_detections(image, np.zeros((0, 4)), [], []))


def test_a_stage_panel_with_nothing_above_the_threshold_shows_its_best_and_says_so():
  image = _grey(64, 96)  # Panels of 512 x 768.
  boxes = np.tile(np.array([[10, 30, 30, 50], [40, 30, 60, 50], [70, 30, 90, 50],
                            [10, 52, 30, 62]], np.float32), (3, 1, 1))
  stage_scores = np.array([[1, 1, 1, 1], [0.9, 0.1, 0.1, 0.1], [0.2, 0.1, 0.15, 0.05]])
  strip = visualize.draw_stages(image, boxes, stage_scores, gap=0)
  panels = [strip[:, s * 768:(s + 1) * 768] for s in range(3)]
  # Stage 2: none reaches 0.3, so proposals 0, 2 and 1 are drawn opaque, 3 is not.
  shown = [np.all(panels[2] == visualize.colour_of(n), axis=-1).any() for n in range(4)]
  assert shown == [True, True, True, False]
  # Both titles sit on a banner; only stage 2's goes on past its name to say why.
  assert _banner_is_drawn(panels[1]) and _banner_is_drawn(panels[2])
  text = [np.any(p[:24, 200:] > 200, axis=-1).any() for p in panels[1:]]
  assert text == [False, True]
