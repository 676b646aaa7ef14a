"""Real photos for the backbone tests, and their float32 tolerance."""
import pathlib

import numpy as np
from PIL import Image


def photos(data_dir: pathlib.Path, size: tuple[int, int], count: int = 4) -> np.ndarray:
  """[count, H, W, 3] float32 RGB 0..255: the first COCO val photos resized to `size` (h, w)."""
  files = sorted((data_dir / "coco_val128" / "val2017").glob("*.jpg"))[:count]
  return np.stack([np.asarray(Image.open(f).convert("RGB").resize(size[::-1], Image.BILINEAR),
                              np.float32) for f in files])


def assert_close(actual, expected, rtol=1e-4):
  """Relative to the largest value: float32 rounding accumulated over ~20 layers."""
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * np.abs(expected).max())
