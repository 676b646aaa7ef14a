"""Pictures of detections and of the iterative head's stages, drawn with PIL.

Images are [H, W, 3] uint8 RGB; boxes are absolute xyxy in that image's pixels, a box
(x1, y1, x2, y2) covering the pixels x1 .. x2 - 1 and y1 .. y2 - 1. Score thresholds here only
decide what is drawn; evaluation always sees every detection.
"""
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


def colour_of(index: int) -> tuple[int, int, int]:
  """The palette colour of a class label (or of a proposal index)."""
  return PALETTE[int(index) % len(PALETTE)]


def _check_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected an [H, W, 3] uint8 RGB image, got {image.shape} {image.dtype}")
  return image


def _draw_box(draw: ImageDraw.ImageDraw, size: tuple[int, int], box: np.ndarray,
              colour: tuple[int, int, int], opacity: float, width: int
              ) -> tuple[int, int, int, int] | None:
  """Outlines one xyxy box, clipped to the image of `size` (W, H).

  Returns the pixel corners (x1, y1, x2, y2) drawn, or None for a box with NaN or inf.
  """
  if not np.all(np.isfinite(box)):
    return None  # A diverged prediction: nothing sensible to draw.
  image_w, image_h = size
  x1, y1, x2, y2 = np.round(box).astype(int)
  x1, x2 = np.clip([x1, x2 - 1], 0, image_w - 1)
  y1, y2 = np.clip([y1, y2 - 1], 0, image_h - 1)
  x2, y2 = max(x1, x2), max(y1, y2)
  draw.rectangle([x1, y1, x2, y2], outline=colour + (round(255 * opacity),), width=width)
  return int(x1), int(y1), int(x2), int(y2)


def _draw_label(draw: ImageDraw.ImageDraw, size: tuple[int, int], xy: tuple[int, int], text: str,
                colour: tuple[int, int, int], above: bool = True):
  """Text on a filled tag whose bottom-left (above=True) or top-left corner is at `xy`.

  The tag is shifted left where it would leave the image of `size` (W, H).
  """
  font = ImageFont.load_default()
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  w, h = right - left + 2, bottom - top + 2
  x, y = max(0, min(xy[0], size[0] - w)), xy[1]
  if above and y - h < 0:
    above = False  # No room above the image's top edge: put the tag inside the box.
  y = y - h if above else y
  draw.rectangle([x, y, x + w - 1, y + h - 1], fill=colour + (255,))
  # Black text on light tags, white on dark ones (ITU-R 601 luma).
  luma = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
  draw.text((x + 1 - left, y + 1 - top), text, font=font,
            fill=(0, 0, 0, 255) if luma > 128 else (255, 255, 255, 255))


def draw_detections(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    class_names: Sequence[str] | None = None, score_threshold: float = 0.3, *,
                    line_width: int = 2) -> np.ndarray:
  """Detections as boxes coloured by class, tagged 'name score'.

  Args:
    image: [H, W, 3] uint8 RGB (not modified).
    boxes: [K, 4] absolute xyxy in image pixels.
    scores: [K].
    labels: [K] contiguous class indices.
    class_names: [C] names of the labels; None tags boxes with the label number.
    score_threshold: detections scoring below it are not drawn.
  Returns:
    [H, W, 3] uint8, with the highest-scoring boxes drawn last (on top).
  """
  canvas = Image.fromarray(_check_image(image))
  draw = ImageDraw.Draw(canvas, "RGBA")  # PIL blends RGBA colours only when drawing on RGB.
  boxes, scores, labels = np.asarray(boxes), np.asarray(scores), np.asarray(labels)
  for k in np.argsort(scores, kind="stable"):
    if scores[k] < score_threshold:
      continue
    colour = colour_of(labels[k])
    corners = _draw_box(draw, canvas.size, boxes[k], colour, 1.0, line_width)
    if corners is not None:
      name = class_names[labels[k]] if class_names is not None else str(int(labels[k]))
      _draw_label(draw, canvas.size, corners[:2], f"{name} {scores[k]:.2f}", colour)
  return np.array(canvas)


def draw_stages(image: np.ndarray, stage_boxes: np.ndarray, stage_scores: np.ndarray | None = None,
                *, score_threshold: float = 0.3, titles: Sequence[str] | None = None,
                line_width: int = 1, gap: int = 4) -> np.ndarray:
  """A strip of panels like Figure 4 of the Sparse R-CNN paper.

  Panel 0 shows the learned proposal boxes in white; panel s shows stage s's boxes, each proposal
  in its own colour throughout, with opacity = its score, so duplicates fade out stage by stage.

  Args:
    image: [H, W, 3] uint8 RGB.
    stage_boxes: [S+1, N, 4] absolute xyxy: the proposal boxes, then each stage's output boxes
      for the same N proposals.
    stage_scores: [S+1, N] in [0, 1] (e.g. the highest class probability), row 0 for the
      proposals (ones show them all, as the paper does); None draws every box opaque.
    score_threshold: boxes scoring below it are not drawn.
    titles: S+1 panel titles; default 'proposals', 'stage 1', ...
    gap: pixels of black between panels.
  Returns:
    [H, (S+1) * W + S * gap, 3] uint8.
  """
  image = _check_image(image)
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
  height, width = image.shape[:2]
  strip = Image.new("RGB", (num_panels * width + (num_panels - 1) * gap, height))
  for s in range(num_panels):
    panel = Image.fromarray(image)
    draw = ImageDraw.Draw(panel, "RGBA")  # Blends: opacity = score.
    for n in np.argsort(scores[s], kind="stable"):
      if scores[s, n] >= score_threshold:
        colour = PROPOSAL_COLOUR if s == 0 else colour_of(n)
        _draw_box(draw, panel.size, stage_boxes[s, n], colour, scores[s, n], line_width)
    _draw_label(draw, panel.size, (0, 0), titles[s], (0, 0, 0), above=False)
    strip.paste(panel, (s * (width + gap), 0))
  return np.array(strip)


def save_png(image: np.ndarray, path: str | os.PathLike) -> pathlib.Path:
  """Writes an [H, W, 3] uint8 RGB image as PNG, creating the folder."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(_check_image(image)).save(path, format="PNG")
  return path


def save_prediction(image: np.ndarray, detections: dict, class_names: Sequence[str],
                    stem: str | os.PathLike, score_threshold: float = 0.3,
                    scale: float | np.ndarray = 1.0) -> list[pathlib.Path]:
  """The pictures of one image's prediction: STEM.png (labelled detections) and
  STEM_stages.png (the learned proposals, then each stage's boxes).

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
                            score_threshold=score_threshold)
  stage_scores = np.asarray(detections["stage_scores"])
  scores = np.concatenate([np.ones((1, stage_scores.shape[-1])), stage_scores])
  strip = draw_stages(image, np.asarray(detections["stage_boxes"]) * scale, scores,
                      score_threshold=score_threshold)
  stem = pathlib.Path(stem)
  return [save_png(picture, stem.with_name(stem.name + ".png")),
          save_png(strip, stem.with_name(stem.name + "_stages.png"))]
