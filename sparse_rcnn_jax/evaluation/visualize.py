"""Pictures of detections and of the iterative head's stages, drawn with PIL.

Images are [H, W, 3] uint8 RGB; boxes are absolute xyxy in that image's pixels, a box
(x1, y1, x2, y2) covering the pixels x1 .. x2 - 1 and y1 .. y2 - 1. Score thresholds here only
decide what is drawn; evaluation always sees every detection.

Small images are enlarged by a whole factor (`upscale_factor`) before drawing, so that labels
and outlines are drawn at a size people can read; lines and the font follow the drawn size.
"""
import functools
import math
import os
import pathlib
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Distinct, saturated colours (the Tableau 10 and a lighter second set).
PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)
PROPOSAL_COLOUR = (255, 255, 255)  # White, as in the paper's Figure 4.
MIN_SIDE = 480  # Default short side of a picture, in pixels: a 16 px font reads well on it.
NUM_BELOW = 3  # Boxes shown, dashed, when none reaches the threshold.
BANNER_OPACITY = 0.7  # Boxes under a banner still show through it.


def colour_of(index: int) -> tuple[int, int, int]:
  """The palette colour of a class label (or of a proposal index)."""
  return PALETTE[int(index) % len(PALETTE)]


def upscale_factor(height: int, width: int, min_side: int | None = MIN_SIDE) -> int:
  """The whole factor that brings the short side to at least `min_side` (1: never shrinks).

  A whole factor with nearest-neighbour resampling turns every pixel the model saw into an
  equal square block: edges stay sharp and a box edge can be judged against pixel edges, where
  bilinear resampling would blur the small objects one looks at.
  """
  short = min(height, width)
  return max(1, math.ceil(min_side / short)) if min_side else 1


def shown_boxes(scores: np.ndarray, finite: np.ndarray, score_threshold: float,
                num_below: int = NUM_BELOW) -> tuple[np.ndarray, bool]:
  """Which boxes a picture draws: those scoring >= the threshold, or, when none does, the
  `num_below` best, so a weak model's picture still shows where it looks.

  Args:
    scores: [K].
    finite: [K] bool, False for boxes that cannot be drawn (NaN or inf coordinates).
  Returns:
    (indices, lowest score first so the best are drawn on top; True when they are below the
    threshold).
  """
  order = np.argsort(scores, kind="stable")
  order = order[np.asarray(finite, bool)[order]]
  above = order[np.asarray(scores)[order] >= score_threshold]
  if len(above):
    return above, False
  return order[max(0, len(order) - num_below):], True


def below_note(score_threshold: float, count: int) -> str:
  """The banner of a picture where no box reaches the threshold."""
  if not count:
    return f"no score >= {score_threshold:.2f}, no box to show"
  best = "the best box" if count == 1 else f"the {count} best"
  return f"no score >= {score_threshold:.2f}: {best} shown dashed"


def _check_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected an [H, W, 3] uint8 RGB image, got {image.shape} {image.dtype}")
  return image


def _enlarged(image: np.ndarray, min_side: int | None) -> tuple[Image.Image, int]:
  """The image as a PIL picture upscaled by `upscale_factor`, and that factor."""
  picture = Image.fromarray(_check_image(image))
  factor = upscale_factor(*image.shape[:2], min_side)
  if factor > 1:
    picture = picture.resize((picture.width * factor, picture.height * factor),
                             Image.Resampling.NEAREST)
  return picture, factor


def _line_width(size: tuple[int, int]) -> int:
  """Outline width for a picture of `size` (W, H): 3 px on a 480 px short side."""
  return max(1, round(min(size) / 160))


def _font(size: tuple[int, int]) -> ImageFont.FreeTypeFont:
  """The label font for a picture of `size` (W, H): 16 px on a 480 px short side."""
  return _font_of_height(max(11, round(min(size) / 30)))


@functools.cache
def _font_of_height(pixels: int) -> ImageFont.FreeTypeFont:
  """Pillow's own scalable font (Pillow >= 10.1), so no font file has to be found."""
  return ImageFont.load_default(size=pixels)


def _draw_box(draw: ImageDraw.ImageDraw, size: tuple[int, int], box: np.ndarray,
              colour: tuple[int, int, int], opacity: float, width: int, dashed: bool = False
              ) -> tuple[int, int, int, int] | None:
  """Outlines one xyxy box, clipped to the image of `size` (W, H); dashed for a box shown
  although below the threshold.

  Returns the pixel corners (x1, y1, x2, y2) drawn, or None for a box with NaN or inf.
  """
  if not np.all(np.isfinite(box)):
    return None  # A diverged prediction: nothing sensible to draw.
  image_w, image_h = size
  x1, y1, x2, y2 = np.round(box).astype(int)
  x1, x2 = (int(v) for v in np.clip([x1, x2 - 1], 0, image_w - 1))
  y1, y2 = (int(v) for v in np.clip([y1, y2 - 1], 0, image_h - 1))
  x2, y2 = max(x1, x2), max(y1, y2)
  fill = colour + (round(255 * opacity),)
  if not dashed:
    draw.rectangle([x1, y1, x2, y2], outline=fill, width=width)
    return x1, y1, x2, y2
  dash = 3 * width
  for x in range(x1, x2 + 1, 2 * dash):  # Top and bottom edges.
    end = min(x + dash - 1, x2)
    draw.rectangle([x, y1, end, min(y1 + width - 1, y2)], fill=fill)
    draw.rectangle([x, max(y2 - width + 1, y1), end, y2], fill=fill)
  for y in range(y1, y2 + 1, 2 * dash):  # Left and right edges.
    end = min(y + dash - 1, y2)
    draw.rectangle([x1, y, min(x1 + width - 1, x2), end], fill=fill)
    draw.rectangle([max(x2 - width + 1, x1), y, x2, end], fill=fill)
  return x1, y1, x2, y2


def _draw_label(draw: ImageDraw.ImageDraw, size: tuple[int, int], xy: tuple[int, int], text: str,
                colour: tuple[int, int, int], above: bool = True):
  """Text on a filled tag whose bottom-left (above=True) or top-left corner is at `xy`.

  The tag is shifted left where it would leave the image of `size` (W, H).
  """
  font = _font(size)
  pad = max(1, font.size // 8)
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  w, h = right - left + 2 * pad, bottom - top + 2 * pad
  x, y = max(0, min(xy[0], size[0] - w)), xy[1]
  if above and y - h < 0:
    above = False  # No room above the image's top edge: put the tag inside the box.
  y = y - h if above else y
  draw.rectangle([x, y, x + w - 1, y + h - 1], fill=colour + (255,))
  # Black text on light tags, white on dark ones (ITU-R 601 luma).
  luma = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
  draw.text((x + pad - left, y + pad - top), text, font=font,
            fill=(0, 0, 0, 255) if luma > 128 else (255, 255, 255, 255))


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
  """`text` in lines no wider than `width` pixels, broken between words."""
  lines = []
  for word in text.split():
    if lines and draw.textlength(lines[-1] + " " + word, font=font) <= width:
      lines[-1] += " " + word
    else:
      lines.append(word)
  return lines


def _draw_banner(draw: ImageDraw.ImageDraw, size: tuple[int, int], text: str) -> None:
  """White text on a translucent black band across the top of the picture of `size` (W, H)."""
  font = _font(size)
  pad = max(2, font.size // 4)
  lines = _wrap(draw, text, font, size[0] - 2 * pad)
  line_height = font.size + pad // 2
  draw.rectangle([0, 0, size[0] - 1, 2 * pad + len(lines) * line_height - 1],
                 fill=(0, 0, 0, round(255 * BANNER_OPACITY)))
  for i, line in enumerate(lines):
    draw.text((pad, pad + i * line_height), line, font=font, fill=(255, 255, 255, 255))


def draw_detections(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    class_names: Sequence[str] | None = None, score_threshold: float = 0.3, *,
                    min_side: int | None = MIN_SIDE, num_below: int = NUM_BELOW,
                    line_width: int | None = None) -> np.ndarray:
  """Detections as boxes coloured by class, tagged 'name score'.

  When no detection reaches the threshold, the `num_below` best are drawn dashed under a banner
  that says so.

  Args:
    image: [H, W, 3] uint8 RGB (not modified).
    boxes: [K, 4] absolute xyxy in image pixels.
    scores: [K].
    labels: [K] contiguous class indices.
    class_names: [C] names of the labels; None tags boxes with the label number.
    score_threshold: detections scoring below it are not drawn (but see above).
    min_side: the picture is enlarged by upscale_factor(H, W, min_side); None or 0 keeps H, W.
    line_width: outline width in picture pixels; None follows the picture's size.
  Returns:
    [f * H, f * W, 3] uint8 (f = upscale_factor), the highest-scoring boxes drawn last (on top).
  """
  canvas, factor = _enlarged(image, min_side)
  draw = ImageDraw.Draw(canvas, "RGBA")  # PIL blends RGBA colours only when drawing on RGB.
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4) * factor
  scores, labels = np.asarray(scores), np.asarray(labels)
  width = line_width or _line_width(canvas.size)
  shown, below = shown_boxes(scores, np.all(np.isfinite(boxes), axis=1), score_threshold,
                             num_below)
  for k in shown:
    colour = colour_of(labels[k])
    corners = _draw_box(draw, canvas.size, boxes[k], colour, 1.0, width, dashed=below)
    name = class_names[labels[k]] if class_names is not None else str(int(labels[k]))
    _draw_label(draw, canvas.size, corners[:2], f"{name} {scores[k]:.2f}", colour)
  if below:
    _draw_banner(draw, canvas.size, below_note(score_threshold, len(shown)))
  return np.array(canvas)


def draw_stages(image: np.ndarray, stage_boxes: np.ndarray, stage_scores: np.ndarray | None = None,
                *, score_threshold: float = 0.3, titles: Sequence[str] | None = None,
                min_side: int | None = MIN_SIDE, num_below: int = NUM_BELOW,
                line_width: int | None = None, gap: int = 4) -> np.ndarray:
  """A strip of panels like Figure 4 of the Sparse R-CNN paper.

  Panel 0 shows the learned proposal boxes in white; panel s shows stage s's boxes, each proposal
  in its own colour throughout, with opacity = its score, so duplicates fade out stage by stage.
  A panel where no box reaches the threshold shows its `num_below` best dashed and opaque,
  tagged with their scores, and its title says so.

  Args:
    image: [H, W, 3] uint8 RGB.
    stage_boxes: [S+1, N, 4] absolute xyxy: the proposal boxes, then each stage's output boxes
      for the same N proposals.
    stage_scores: [S+1, N] in [0, 1] (e.g. the highest class probability), row 0 for the
      proposals (ones show them all, as the paper does); None draws every box opaque.
    score_threshold: boxes scoring below it are not drawn (but see above).
    titles: S+1 panel titles; default 'proposals', 'stage 1', ...
    min_side: each panel is enlarged by upscale_factor(H, W, min_side); None or 0 keeps H, W.
    line_width: outline width in picture pixels; None follows the picture's size.
    gap: pixels of black between panels.
  Returns:
    [f * H, (S+1) * f * W + S * gap, 3] uint8 (f = upscale_factor).
  """
  stage_boxes = np.asarray(stage_boxes, np.float64)
  num_panels, num_proposals = stage_boxes.shape[:2]
  scores = (np.ones((num_panels, num_proposals)) if stage_scores is None
            else np.clip(np.asarray(stage_scores, np.float64), 0.0, 1.0))
  if stage_boxes.shape[2:] != (4,) or scores.shape != (num_panels, num_proposals):
    raise ValueError(f"expected stage_boxes [S+1, N, 4] and stage_scores [S+1, N], got "
                     f"{stage_boxes.shape} and {scores.shape}")
  if titles is None:
    titles = ["proposals"] + [f"stage {s}" for s in range(1, num_panels)]
  if len(titles) != num_panels:
    raise ValueError(f"{len(titles)} titles for {num_panels} panels")
  picture, factor = _enlarged(image, min_side)
  stage_boxes = stage_boxes * factor
  # Many overlapping proposals: thinner lines than a detection picture's.
  width = line_width or max(1, _line_width(picture.size) - 1)
  strip = Image.new("RGB", (num_panels * picture.width + (num_panels - 1) * gap, picture.height))
  for s in range(num_panels):
    panel = picture.copy()
    draw = ImageDraw.Draw(panel, "RGBA")  # Blends: opacity = score.
    finite = np.all(np.isfinite(stage_boxes[s]), axis=1)
    shown, below = shown_boxes(scores[s], finite, score_threshold, num_below)
    for n in shown:
      colour = PROPOSAL_COLOUR if s == 0 else colour_of(n)
      corners = _draw_box(draw, panel.size, stage_boxes[s, n], colour,
                          1.0 if below else scores[s, n], width, dashed=below)
      if below:
        _draw_label(draw, panel.size, corners[:2], f"{scores[s, n]:.2f}", colour)
    _draw_banner(draw, panel.size, titles[s] + (
        f" - {below_note(score_threshold, len(shown))}" if below else ""))
    strip.paste(panel, (s * (picture.width + gap), 0))
  return np.array(strip)


def save_png(image: np.ndarray, path: str | os.PathLike) -> pathlib.Path:
  """Writes an [H, W, 3] uint8 RGB image as PNG, creating the folder."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(_check_image(image)).save(path, format="PNG")
  return path


def save_prediction(image: np.ndarray, detections: dict, class_names: Sequence[str],
                    stem: str | os.PathLike, score_threshold: float = 0.3,
                    scale: float | np.ndarray = 1.0, min_side: int | None = MIN_SIDE
                    ) -> list[pathlib.Path]:
  """The pictures of one image's prediction: STEM.png (labelled detections) and
  STEM_stages.png (the learned proposals, then each stage's boxes), both enlarged to a short
  side of at least `min_side` pixels.

  Args:
    image: [H, W, 3] uint8 RGB, the picture to draw on.
    detections: one image's entries of inference.make_predict_fn's output: "boxes" [K, 4],
      "scores" [K], "labels" [K], "valid" [K], "stage_boxes" [S + 1, N, 4] (original-image
      xyxy) and "stage_scores" [S, N].
    scale: multiplies every box: from original-image pixels to `image`'s (1 when `image` is
      the original; (sx, sy, sx, sy) for a resized one).
  """
  keep = np.asarray(detections["valid"], bool)
  picture = draw_detections(image, np.asarray(detections["boxes"])[keep] * scale,
                            np.asarray(detections["scores"])[keep],
                            np.asarray(detections["labels"])[keep], class_names,
                            score_threshold=score_threshold, min_side=min_side)
  stage_scores = np.asarray(detections["stage_scores"])
  scores = np.concatenate([np.ones((1, stage_scores.shape[-1])), stage_scores])
  strip = draw_stages(image, np.asarray(detections["stage_boxes"]) * scale, scores,
                      score_threshold=score_threshold, min_side=min_side)
  stem = pathlib.Path(stem)
  return [save_png(picture, stem.with_name(stem.name + ".png")),
          save_png(strip, stem.with_name(stem.name + "_stages.png"))]
