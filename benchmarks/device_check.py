"""The headline table on one accelerator, within a wall-clock budget.

  python benchmarks/device_check.py             # one GPU: R-50 FPN, 100 proposals, <= ~8 min
  python benchmarks/device_check.py --smoke     # every part once at tiny shapes, any machine

Rows, in this order (random weights and ground truth: speed does not depend on them), all in
this one process, each compiled once:
  inference  R-50 FPN, 100 proposals, 800x1333 images padded to 800x1344 (as the eval
             transform does), batch 1 and 8, float32 and bfloat16: images/s through the
             jitted model and post-processing.
  training   the trainer's jitted step at the largest bucket of the official recipe (800x1344),
             2 and 16 images, float32 and bfloat16, with the scipy matcher (host, through a
             callback), the device matcher, and a stand-in that solves nothing (greedy): the
             matching share of a matcher is 1 - step(stand-in) / step(matcher).
Each row reports its compile time and the memory its program needs (XLA's memory analysis:
arguments + outputs + temporaries - donated aliases; the process's peak RSS on a CPU). The
goals stand beside the GPU rows: >= 70 images/s float32 and >= 100 bfloat16 inference, >= 38
train images/s per GPU (300 per 8 GPUs). Rows that would start after --budget_s seconds are
skipped and listed as such, so the script ends near the budget on a slow machine, and every
finished row is on disk at once (results/device_check_PLATFORM.partial.json).
Writes benchmarks/results/device_check_PLATFORM.json (or --out).
"""
import argparse
import json
import pathlib
import sys
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import bench_inference, bench_matching, bench_train_step, common
from configs import r50_100pro_3x, tiny
from sparse_rcnn_jax.training import matcher

DTYPES = ("float32", "bfloat16")
MATCHERS = ("scipy", "device", "none")   # "none": the stand-in for the matching share
INFERENCE_GOAL = {"float32": 70.0, "bfloat16": 100.0}
TRAINING_GOAL_PER_DEVICE = 300.0 / 8
FULL = dict(config=r50_100pro_3x, hw=(800, 1344), inference_batches=(1, 8),
            train_batches=(2, 16), train_dtypes=DTYPES, matchers=MATCHERS, repeats=5,
            num_stages=None)
# Every part of the script once, as cheaply as it goes: a one-stage tiny model at 64x96.
SMOKE = dict(config=tiny, hw=(64, 96), inference_batches=(1,), train_batches=(2,),
             train_dtypes=("float32",), matchers=("device", "none"), repeats=1, num_stages=1)


def plan(setting: dict) -> list[dict]:
  """The rows to measure, in order."""
  rows = [dict(part="inference", dtype=d, batch=b)
          for d in DTYPES for b in setting["inference_batches"]]
  rows += [dict(part="training", dtype=d, batch=b, matcher=m)
           for d in setting["train_dtypes"] for b in setting["train_batches"]
           for m in setting["matchers"]]
  return rows


def _config(setting: dict, dtype: str, matcher_name: str = "scipy"):
  config = setting["config"].get_config()
  config.model.dtype = dtype
  config.model.num_stages = setting["num_stages"] or config.model.num_stages
  config.loss.matcher = matcher_name
  return config


def measure(row: dict, setting: dict) -> dict:
  """One row, in this process."""
  height, width = setting["hw"]
  repeats = setting["repeats"]
  if row["part"] == "inference":
    out = bench_inference.bench_config(_config(setting, row["dtype"]), height, width,
                                       row["batch"], repeats)
    return {"compile_s": out["compile_s"], "images_per_s": out["images_per_s"],
            "program_mb": out["program_mb"]}
  matcher.MATCHERS.setdefault("none", bench_matching.greedy_assignment)
  timed = bench_train_step.time_steps(*bench_train_step.prepare(
      _config(setting, row["dtype"], row["matcher"]), row["batch"], height, width), repeats)
  return {"compile_s": timed["compile_s"], "step_s": timed["step_s"],
          "images_per_s": row["batch"] / timed["step_s"], "program_mb": timed["program_mb"]}


def summarize(rows: list[dict], platform: str) -> list[dict]:
  """Matching shares from the stand-in rows, goals beside the GPU rows."""
  standin = {(r["dtype"], r["batch"]): r["step_s"] for r in rows
             if r.get("matcher") == "none" and "step_s" in r}
  table = []
  for r in rows:
    line = dict(r)
    if r["part"] == "training" and r["matcher"] != "none" and "step_s" in r:
      base = standin.get((r["dtype"], r["batch"]))
      if base is not None:
        line["matching_share"] = 1.0 - base / r["step_s"]
    if platform == "gpu" and "images_per_s" in r:
      if r["part"] == "inference":
        goal = INFERENCE_GOAL[r["dtype"]]
      elif r["matcher"] != "none":
        goal = TRAINING_GOAL_PER_DEVICE * jax.device_count()
      else:
        goal = None
      if goal is not None:
        line["goal"] = f"{'meets' if r['images_per_s'] >= goal else 'misses'} {goal:g}"
    table.append(line)
  return table


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny config at tiny shapes")
  parser.add_argument("--budget_s", type=float, default=450.0,
                      help="no row starts after this many seconds (default: 7.5 minutes)")
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args(argv)
  setting = SMOKE if args.smoke else FULL
  platform = jax.default_backend()
  name = f"device_check{'_smoke' if args.smoke else ''}"
  out = args.out or common.RESULTS_DIR / f"{name}_{platform}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  partial = out.with_name(out.stem + ".partial.json")
  start = time.perf_counter()
  rows = []
  todo = plan(setting)
  for i, row in enumerate(todo):
    elapsed = time.perf_counter() - start
    if elapsed > args.budget_s:
      rows.append({**row, "skipped": f"over the {args.budget_s:g} s budget"})
      continue
    print(f"[{i + 1}/{len(todo)} at {elapsed:.0f} s] {row}", flush=True)
    try:
      rows.append({**row, **measure(row, setting)})
    except Exception as error:  # pylint: disable=broad-except
      # A row that fails (out of memory, say) is reported; the others still run.
      rows.append({**row, "error": f"{type(error).__name__}: {str(error)[:200]}"})
    partial.write_text(json.dumps({"machine": common.machine(), "details": rows}, indent=1))
  table = summarize(rows, platform)
  columns = ["part", "dtype", "matcher", "batch", "compile_s", "images_per_s", "matching_share",
             "program_mb", "goal", "skipped", "error"]
  common.report(name, table, columns, details=[
      {"hw": "x".join(map(str, setting["hw"])), "model": setting["config"].__name__,
       "wall_s": time.perf_counter() - start, "budget_s": args.budget_s,
       **common.peak_memory_mb()}], out=out)
  partial.unlink(missing_ok=True)
  return table


if __name__ == "__main__":
  main()
