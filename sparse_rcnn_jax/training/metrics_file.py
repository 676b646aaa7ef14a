"""A run's metrics.jsonl (written by metric_writer.py) read back: its records per step, and the
learning curve in a few windows.

  python -m sparse_rcnn_jax.training.metrics_file WORKDIR [--points N] [--key loss]   # prints the curve
"""
import json
import pathlib


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
  """python -m sparse_rcnn_jax.training.metrics_file WORKDIR [--points N]: print a run's loss curve."""
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
