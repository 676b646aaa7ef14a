"""Overfit check (slow): the tiny config on 8 images drives the loss down steadily.

  python -m pytest -m slow tests/test_overfit.py     # float32 and bfloat16
  python benchmarks/overfit.py     # the same runs, with the curve printed and saved
"""
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import overfit  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["coco128", "synthetic"])
def test_loss_falls_steadily_on_eight_images(name, dtype, data_dir):
  del data_dir  # skips when ../shared is absent (coco128 needs it)
  losses = overfit.overfit(name, steps=200, dtype=dtype)
  assert len(losses) == 200 and np.isfinite(losses).all()
  means = [m for _, _, m in overfit.windows(losses, 5)]
  assert means[-1] < 0.5 * means[0], means
  # Steadily: every window of 40 steps below the first, and the last two below the middle.
  assert all(m < means[0] for m in means[1:]), means
  assert max(means[-2:]) < means[2], means
