"""A run's learning curves as WORKDIR/metrics.png, drawn from its metrics.jsonl.

  python -m sparse_rcnn_jax.training.plots WORKDIR

Left: the training loss (log scale), raw and smoothed, and its three weighted terms summed over
the stages (they add up to the loss, so the plot shows which term dominates). Right: the
evaluation AP and AP50 in percent, or "no evaluation yet". Drawn with matplotlib's Figure and
Agg canvas directly: no pyplot, so nothing global (backend, open figures) is touched.
"""
import argparse
import pathlib
import re

from matplotlib import ticker
from matplotlib.figure import Figure
import numpy as np

from sparse_rcnn_jax.training import metrics_file

FIGURE_SIZE = (12.0, 4.5)  # Inches; at DPI a 1200 x 450 picture.
DPI = 100
LOSS_COLOUR = "#1f77b4"
TERM_COLOURS = ("#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
EVAL_KEYS = (("eval/AP", "#1f77b4"), ("eval/AP50", "#ff7f0e"))
# "weighted_loss_ce_3": loss term loss_ce of stage 3, times its weight (losses.py).
_WEIGHTED_TERM = re.compile(r"^weighted_(.+)_(\d+)$")
_LABEL_BOX = {"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none",
              "alpha": 0.8}  # Keeps a value's label readable over the curves.


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """The steps and values of `key` in the records that hold it.

  Args:
    records: metrics_file.read_metrics's output, sorted by step.
  Returns:
    (steps [T] int, values [T] float); non-finite values, written as "nan" or "inf", are NaN
    (a gap in the curve).
  """
  held = [r for r in records if key in r]
  values = np.array([float(r[key]) for r in held], np.float64).reshape(-1)
  return (np.array([r["step"] for r in held], np.int64),
          np.where(np.isfinite(values), values, np.nan))


def term_series(records: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Each weighted loss term summed over the stages: {"loss_ce": (steps [T], values [T])}."""
  stages = {}
  for key in dict.fromkeys(k for r in records for k in r):
    match = _WEIGHTED_TERM.match(key)
    if match:
      stages.setdefault(match.group(1), []).append(key)
  terms = {}
  for term, keys in stages.items():
    held = [r for r in records if all(k in r for k in keys)]
    values = np.array([sum(float(r[k]) for k in keys) for r in held], np.float64)
    terms[term] = (np.array([r["step"] for r in held], np.int64),
                   np.where(np.isfinite(values), values, np.nan))
  return terms


def smooth(values: np.ndarray, window: int) -> np.ndarray:
  """[T] trailing means over the last `window` values, NaNs left out (NaN where all are)."""
  finite = np.isfinite(values)
  sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
  counts = np.concatenate([[0], np.cumsum(finite)])
  ends = np.arange(1, len(values) + 1)
  starts = np.maximum(ends - window, 0)
  n = counts[ends] - counts[starts]
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(n > 0, (sums[ends] - sums[starts]) / n, np.nan)


def _draw_loss(ax, records: list[dict]) -> None:
  steps, loss = series(records, "loss")
  if not len(steps):
    ax.text(0.5, 0.5, "no training loss yet", ha="center", va="center", transform=ax.transAxes)
    return
  window = max(1, len(steps) // 25)  # About 25 windows along the run, whatever its length.
  if window > 1:
    ax.plot(steps, loss, color=LOSS_COLOUR, alpha=0.3, linewidth=0.8)
  ax.plot(steps, smooth(loss, window), color=LOSS_COLOUR, linewidth=2, label="loss")
  for (term, (term_steps, values)), colour in zip(sorted(term_series(records).items()),
                                                  TERM_COLOURS):
    ax.plot(term_steps, smooth(values, window), color=colour, linewidth=1.2,
            label=f"{term} (all stages)")
  ax.set_yscale("log")  # The loss falls by orders of magnitude early and by percents late.
  plain = ticker.FuncFormatter(lambda value, _: f"{value:g}")  # "20", not "2 x 10^1".
  ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2, 3, 5)))  # Labels that do not crowd.
  ax.yaxis.set_major_formatter(plain)
  ax.yaxis.set_minor_formatter(plain)
  ax.set_title("training loss" + (f" (mean of {window} logs)" if window > 1 else ""))
  ax.set_ylabel("weighted loss")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(loc="upper right", fontsize="small")
  if np.isfinite(loss).any():
    last = np.flatnonzero(np.isfinite(loss))[-1]
    ax.annotate(f"last {loss[last]:.3g}", (steps[last], loss[last]), textcoords="offset points",
                xytext=(-4, 8), ha="right", fontsize="small", color=LOSS_COLOUR, bbox=_LABEL_BOX)


def _draw_eval(ax, records: list[dict]) -> None:
  drawn = False
  for key, colour in EVAL_KEYS:
    steps, values = series(records, key)
    values = np.where(values >= 0, 100 * values, np.nan)  # COCO writes -1 for "undefined".
    if not np.isfinite(values).any():
      continue
    drawn = True
    name = key.removeprefix("eval/")
    ax.plot(steps, values, color=colour, marker="o", linewidth=1.5, label=name)
    last = np.flatnonzero(np.isfinite(values))[-1]
    ax.annotate(f"{name} {values[last]:.1f}", (steps[last], values[last]),
                textcoords="offset points", xytext=(-4, 8), ha="right", fontsize="small",
                color=colour, bbox=_LABEL_BOX)
  ax.set_title("evaluation")
  if not drawn:
    ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes,
            fontsize="large", color="0.4")
    ax.set_yticks([])
    return
  ax.set_ylabel("%")
  ax.set_ylim(0, ax.get_ylim()[1] * 1.1)  # Room for the labels above the highest point.
  ax.grid(True, alpha=0.3)
  ax.legend(loc="lower right", fontsize="small")


def draw_curves(records: list[dict], title: str = "") -> Figure:
  """The figure of a run's curves (see the module docstring)."""
  figure = Figure(figsize=FIGURE_SIZE, dpi=DPI, layout="constrained")
  loss_ax, eval_ax = figure.subplots(1, 2, sharex=True)
  _draw_loss(loss_ax, records)
  _draw_eval(eval_ax, records)
  for ax in (loss_ax, eval_ax):
    ax.set_xlabel("step")
  if records:
    loss_ax.set_xlim(0, max(r["step"] for r in records))
  if title:
    figure.suptitle(title)
  return figure


def save_curves(metrics_path: str | pathlib.Path, png_path: str | pathlib.Path | None = None
                ) -> pathlib.Path:
  """Draws the curves of a metrics.jsonl file into a PNG (default: beside it, metrics.png).

  Written to a temporary name first, then renamed, so a reader never sees half a picture.
  """
  metrics_path = pathlib.Path(metrics_path)
  png_path = pathlib.Path(png_path or metrics_path.with_suffix(".png"))
  records = metrics_file.read_metrics(metrics_path)
  last = f" - step {records[-1]['step']}" if records else ""
  figure = draw_curves(records, title=f"{metrics_path.parent.name}{last}")
  partial = png_path.with_name(png_path.name + ".partial")
  figure.savefig(partial, format="png")
  return partial.replace(png_path)


def main(argv=None):
  """python -m sparse_rcnn_jax.training.plots WORKDIR [--out PNG]: (re)draw a run's metrics.png."""
  parser = argparse.ArgumentParser(description="Draw the learning curves of a training workdir.")
  parser.add_argument("workdir")
  parser.add_argument("--out", default=None, help="PNG path (default: WORKDIR/metrics.png).")
  args = parser.parse_args(argv)
  path = pathlib.Path(args.workdir) / "metrics.jsonl"
  if not path.exists():
    raise SystemExit(f"No {path}: not a training workdir, or nothing was logged yet.")
  print(save_curves(path, args.out))


if __name__ == "__main__":
  main()
