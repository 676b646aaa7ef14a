"""Training metrics as JSON lines in the workdir, their curves as a PNG beside them (plots.py),
plus TensorBoard events where a writer exists.

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
    # Imported when first needed: plots imports this module, and matplotlib takes seconds.
    from sparse_rcnn_jax import plots  # pylint: disable=g-import-not-at-top
    self._plotted_at = time.monotonic()
    try:
      return plots.save_curves(self.path)
    except Exception:  # pylint: disable=broad-except
      log.warning("Could not draw the curves of %s.", self.path, exc_info=True)
      return None


def read_metrics(path: str | pathlib.Path) -> list[dict]:
  """The records of a metrics.jsonl file, one per step, sorted by step.

  Lines of the same step are merged (training and evaluation scalars are written separately);
  where a key repeats, as for steps run again after a resume, the last value wins.
  """
  by_step = {}
  for line in pathlib.Path(path).read_text().splitlines():
    if line.strip():
      record = json.loads(line)
      by_step.setdefault(record["step"], {}).update(record)
  return [by_step[s] for s in sorted(by_step)]


def learning_curve(records: list[dict], points: int = 10, key: str = "loss") -> list[dict]:
  """The curve of `key` in `points` windows of consecutive logged steps.

  Returns:
    One row per window: "steps" ("first-last"), "mean_<key>" over the window's records, and the
    newest evaluation scalars ("eval/..."), if any, logged up to the window's last step.
  """
  logged = [r for r in records if key in r]
  if not logged:
    return []
  edges = sorted({round(i * len(logged) / points) for i in range(points + 1)})
  rows, evals = [], {}
  for a, b in zip(edges, edges[1:]):
    last_step = logged[b - 1]["step"]
    evals.update({k: v for r in records if r["step"] <= last_step
                  for k, v in r.items() if k.startswith("eval/")})
    values = [r[key] for r in logged[a:b] if isinstance(r[key], (int, float))]
    rows.append({"steps": f"{logged[a]['step']}-{last_step}",
                 f"mean_{key}": sum(values) / len(values) if values else float("nan"), **evals})
  return rows


def main(argv=None):
  """python -m sparse_rcnn_jax.metric_writer WORKDIR [--points N]: print a run's loss curve."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description="Print the loss curve of a training workdir.")
  parser.add_argument("workdir")
  parser.add_argument("--points", type=int, default=10)
  parser.add_argument("--key", default="loss")
  args = parser.parse_args(argv)
  path = pathlib.Path(args.workdir) / "metrics.jsonl"
  if not path.exists():
    raise SystemExit(f"No {path}: not a training workdir, or nothing was logged yet.")
  rows = learning_curve(read_metrics(path), args.points, args.key)
  columns = list(dict.fromkeys(k for r in rows for k in r))
  print("| " + " | ".join(columns) + " |")
  print("|" + "---|" * len(columns))
  for r in rows:
    cells = [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns]
    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
