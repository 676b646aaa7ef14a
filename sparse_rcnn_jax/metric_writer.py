"""Training metrics as JSON lines in the workdir, plus TensorBoard events where a writer exists.

Only the lead host writes. TensorBoard needs `tensorboardX` (optional: pip install tensorboardX);
without it the JSON lines are the record.
"""
import json
import math
import pathlib

import jax


class MetricWriter:
  """Appends {"step": s, **scalars} lines to WORKDIR/metrics.jsonl."""

  def __init__(self, workdir: str | pathlib.Path, filename: str = "metrics.jsonl"):
    self.enabled = jax.process_index() == 0
    self.path = pathlib.Path(workdir) / filename
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


def read_metrics(path: str | pathlib.Path) -> list[dict]:
  """The lines of a metrics.jsonl file (the last occurrence of a step wins, as after resume)."""
  by_step = {}
  for line in pathlib.Path(path).read_text().splitlines():
    if line.strip():
      record = json.loads(line)
      by_step[record["step"]] = record
  return [by_step[s] for s in sorted(by_step)]
