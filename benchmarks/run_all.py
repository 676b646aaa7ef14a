"""Every benchmark on the platform JAX sees (cpu, gpu, tpu), in float32 and bfloat16, with the
scipy and the device matcher; one summary table.

  python benchmarks/run_all.py             # the full set (a GPU: minutes; a 2-core CPU: ~1 h)
  python benchmarks/run_all.py --quick     # the tiny config at small shapes: checks it runs
  python benchmarks/run_all.py --dtypes bfloat16 --matchers device   # a part of the set

Rows (random weights and ground truth: speed does not depend on them):
  inference  R-50 FPN, 100 and 300 proposals, 800x1333 images (padded to 800x1344, as the eval
             transform does), batch 1 and 8, float32 and bfloat16: images/s through the jitted
             model and post-processing.
  training   R-50 FPN, 100 proposals, the official recipe's shapes: 2 images per device (16 on
             8 devices) and every multi-scale bucket the train transform pads to; float32 and
             bfloat16 x scipy and device matcher. images/s is over all buckets, each drawn
             equally often (total images / total time); the matching share is measured on the
             largest bucket: (step - step with a stand-in that solves nothing) / step.
Each row runs in its own process, so "peak_mb" (the device's peak where JAX reports it, else
the host's peak RSS) is that row's alone and a row that runs out of memory fails alone.
Writes benchmarks/results/run_all_PLATFORM.json (or --out).
"""
import argparse
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# pylint: disable=g-import-not-at-top,wrong-import-position
import jax

from benchmarks import bench_inference, bench_matching, bench_train_step, common
from configs import r50_100pro_3x, r50_300pro_3x, tiny
from sparse_rcnn_jax.data import pipeline
from sparse_rcnn_jax.model import detector
from sparse_rcnn_jax.training import matcher

DTYPES = ("float32", "bfloat16")
MATCHERS = ("scipy", "device")
CONFIGS = {"r50_100pro": r50_100pro_3x, "r50_300pro": r50_300pro_3x, "tiny": tiny}
# The GPU goals for one H100/H200, R-50, 100 proposals: inference images/s by dtype, and
# training fast enough for the 3x schedule (270k steps x 16 images) in 4 h on 8 such devices.
INFERENCE_TARGET = {"float32": 70.0, "bfloat16": 100.0}
TRAINING_TARGET_PER_DEVICE = 300.0 / 8


def plan(quick: bool, dtypes=DTYPES, matchers=MATCHERS) -> list[dict]:
  """Every row to run, as the arguments of `run_row`."""
  if quick:
    inference = [dict(part="inference", model="tiny", proposals=10, hw=(128, 160), batch=b,
                      dtype=d) for d in dtypes for b in (1, 2)]
    model, buckets = "tiny", [(128, 128)]
  else:
    inference = [dict(part="inference", model=f"r50_{p}pro", proposals=p, hw=(800, 1344),
                      batch=b, dtype=d) for p in (100, 300) for d in dtypes for b in (1, 8)]
    model = "r50_100pro"
    config = _config(model, "float32", "scipy")
    multiple = detector.build_model(config.model).backbone.size_divisibility
    buckets = sorted(pipeline.batch_shapes(config.data, "train", size_divisibility=multiple),
                     key=lambda s: s[0] * s[1])
  training = [dict(part="training", model=model, hw=tuple(hw), dtype=d, matcher=m,
                   batch=2 * jax.device_count(), share=hw == buckets[-1])
              for d in dtypes for m in matchers for hw in buckets]
  return inference + training


def _config(model: str, dtype: str, matcher_name: str):
  config = CONFIGS[model].get_config()
  config.model.dtype = dtype
  config.loss.matcher = matcher_name
  return config


def run_row(row: dict, repeats: int) -> dict:
  """Measures one row in this process."""
  height, width = row["hw"]
  if row["part"] == "inference":
    return bench_inference.bench_config(_config(row["model"], row["dtype"], "scipy"), height,
                                        width, row["batch"], repeats)
  config = _config(row["model"], row["dtype"], row["matcher"])
  out = bench_train_step.time_steps(*bench_train_step.prepare(config, row["batch"], height,
                                                              width), repeats)
  if row["share"]:
    matcher.MATCHERS["none"] = bench_matching.greedy_assignment
    config.loss.matcher = "none"
    baseline = bench_train_step.time_steps(*bench_train_step.prepare(
        config, row["batch"], height, width), repeats)
    # Within timing noise of 0 the share can come out slightly negative: reported as is.
    out["matching_share"] = 1.0 - baseline["step_s"] / out["step_s"]
  return {**out, **common.peak_memory_mb()}


def _in_subprocess(row: dict, repeats: int) -> dict:
  proc = subprocess.run([sys.executable, __file__, "--row", json.dumps(row),
                         "--repeats", str(repeats)], capture_output=True, text=True,
                        check=False, cwd=ROOT)
  if proc.returncode != 0:
    return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(rows: list[dict], platform: str) -> list[dict]:
  """One line per inference row and per (dtype, matcher) of training; targets on GPU only."""
  table = []
  for r in rows:
    if r["part"] == "inference" and "error" not in r:
      line = {**r, "peak_mb": r.get("device_peak_mb", r.get("host_peak_rss_mb"))}
      if platform == "gpu" and r["model"] == "r50_100pro":
        line["target"] = _verdict(r["images_per_s"], INFERENCE_TARGET[r["dtype"]])
      table.append(line)
    elif r["part"] == "inference":
      table.append(r)
  groups = {}
  for r in rows:
    if r["part"] == "training":
      groups.setdefault((r["model"], r["dtype"], r["matcher"]), []).append(r)
  for (model, dtype, matcher_name), group in groups.items():
    line = {"part": "training", "model": model, "dtype": dtype, "matcher": matcher_name,
            "batch": group[0]["batch"], "hw": "buckets " + " ".join(
                f"{h}x{w}" for h, w in (g["hw"] for g in group))}
    failed = [g["error"] for g in group if "error" in g]
    if failed:
      table.append({**line, "error": failed[0]})
      continue
    seconds = sum(g["step_s"] for g in group)
    line.update(images_per_s=line["batch"] * len(group) / seconds,
                compile_s=sum(g["compile_s"] for g in group),
                peak_mb=max(g.get("device_peak_mb", g.get("host_peak_rss_mb")) for g in group),
                matching_share=next(g["matching_share"] for g in group if g["share"]))
    if platform == "gpu" and model == "r50_100pro":
      per_device = line["images_per_s"] / jax.device_count()
      line["target"] = _verdict(per_device, TRAINING_TARGET_PER_DEVICE)
    table.append(line)
  return table


def _verdict(value: float, target: float) -> str:
  return f"{'meets' if value >= target else 'misses'} {target:g}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny config, small shapes")
  parser.add_argument("--dtypes", nargs="+", default=DTYPES, choices=DTYPES)
  parser.add_argument("--matchers", nargs="+", default=MATCHERS, choices=MATCHERS)
  parser.add_argument("--repeats", type=int, default=None, help="timed calls per row")
  parser.add_argument("--out", type=pathlib.Path, default=None)
  parser.add_argument("--row", help=argparse.SUPPRESS)   # internal: one row, JSON out
  args = parser.parse_args()
  repeats = args.repeats or (2 if args.quick else 5)
  if args.row:
    row = json.loads(args.row)
    row["hw"] = tuple(row["hw"])
    print(json.dumps(run_row(row, repeats)))
    return
  platform = jax.default_backend()
  out = args.out or common.RESULTS_DIR / f"run_all_{platform}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  rows = []
  todo = plan(args.quick, args.dtypes, args.matchers)
  for i, row in enumerate(todo):
    print(f"[{i + 1}/{len(todo)}] {row}", flush=True)
    rows.append({**row, **_in_subprocess(row, repeats)})
    # Every finished row is on disk at once: a run stopped midway keeps what it measured.
    partial = out.with_name(out.stem + ".partial.json")
    partial.write_text(json.dumps({"machine": common.machine(), "details": rows}, indent=1))
  table = summarize(rows, platform)
  columns = ["part", "model", "dtype", "matcher", "hw", "batch", "compile_s", "images_per_s",
             "peak_mb", "matching_share", "target", "error"]
  for line in table:
    if isinstance(line.get("hw"), (tuple, list)):
      line["hw"] = "x".join(map(str, line["hw"]))
  common.report("run_all", table, columns, details=rows, out=out)
  partial.unlink()


if __name__ == "__main__":
  main()
