"""Training metrics as JSON lines in the workdir, their curves as a PNG beside them (plots.py),
plus TensorBoard events where a writer exists. metrics_file.py reads the lines back.

Only the lead host writes. TensorBoard needs `tensorboardX` (optional: pip install tensorboardX);
without it the JSON lines are the record.
"""
import json
import logging
import math
import pathlib
import time

import jax

log = logging.getLogger(__name__)

# Drawing the curves takes 0.3-0.6 s for a 3000-step run's 120 log lines (1.2-1.5 s for 13,500;
# importing matplotlib ~2 s, once) on two busy cores, where configs/synthetic.py logs every ~5 s:
# redrawing at every log would slow it by ~10 %, once a minute by under 1 %.
PLOT_EVERY_S = 60.0


class MetricWriter:
  """Appends {"step": s, **scalars} lines to WORKDIR/metrics.jsonl and redraws their curves in
  WORKDIR/metrics.png: after every write of evaluation scalars ("eval/..."), otherwise at most
  once per `plot_every_s` seconds (None: only when plot() is called)."""

  def __init__(self, workdir: str | pathlib.Path, filename: str = "metrics.jsonl",
               plot_every_s: float | None = PLOT_EVERY_S):
    self.enabled = jax.process_index() == 0
    self.path = pathlib.Path(workdir) / filename
    self._plot_every_s = plot_every_s
    self._plotted_at = time.monotonic()  # A run's first picture comes after plot_every_s.
    self._tb = None
    if self.enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))
      except ImportError:
        pass

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    clean = {k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}
    with self.path.open("a") as f:
      f.write(json.dumps({"step": int(step), **clean}) + "\n")
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()
    if self._plot_every_s is not None and (
        any(k.startswith("eval/") for k in values)
        or time.monotonic() - self._plotted_at >= self._plot_every_s):
      self.plot()

  def plot(self) -> pathlib.Path | None:
    """Redraws the curves now (lead host only); returns the PNG's path, or None.

    A failure is logged, not raised: a picture is not worth a training run.
    """
    if not self.enabled or not self.path.exists():
      return None
    # Imported when first needed: matplotlib takes seconds to import.
    from sparse_rcnn_jax.training import plots  # pylint: disable=g-import-not-at-top
    self._plotted_at = time.monotonic()
    try:
      return plots.save_curves(self.path)
    except Exception:  # pylint: disable=broad-except
      log.warning("Could not draw the curves of %s.", self.path, exc_info=True)
      return None
