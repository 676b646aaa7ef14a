"""Runs the set-prediction loss + gradient step sharded over a "data" mesh, many times, and
checks every step against the same step on one device. Launched by test_sharded_loss.py.

  # 8 CPU devices in one process:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_loss_worker.py \
      --mode devices --steps 50
  # one device in each of 2 processes (run both, ids 0 and 1):
  python tests/sharded_loss_worker.py --mode processes --port 12345 --process-id 0 --steps 50
  # either with the matching solved on the device: add --matcher device

A tiny replicated "model" (a per-class logit scale and a box shift) turns batch-sharded base
predictions into pred_logits / pred_boxes, so the gradient is all-reduced over devices as in
training, and each step updates it. Each device's cost blocks exceed 100 KiB, the size above
which pure_callback's arguments used to reach the callback through an asynchronous copy (see
matcher.py). The host dispatches `--window` steps before reading them: pipelined, but fewer
than 32 in flight (the limit matcher.py's docstring explains). Prints one JSON line; exits 1
on a mismatch. The JSON also counts the all-gathers, host callbacks and the matching's
collectives in the compiled per-device program. `--matcher` picks config.loss.matcher.
"""
import argparse
import faulthandler
import json
import re
import sys
import time

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparse_rcnn_jax.training import losses

S, N, C, M = 3, 100, 8, 100   # stages, proposals, classes, GT slots: 120 KB of costs per image
BATCH_PER_DEVICE = 1


def make_problem(batch: int, seed: int = 0) -> tuple[dict, dict]:
  """Base predictions [S, B, ...] and padded targets [B, ...]; image 0 has no boxes."""
  rng = np.random.default_rng(seed)
  whwh = np.tile(np.array([[640, 480, 640, 480]], np.float32), (batch, 1))
  xy = rng.uniform(0, 400, (S, batch, N, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(8, 240, (S, batch, N, 2))], -1)
  gxy = rng.uniform(0, 400, (batch, M, 2))
  counts = rng.integers(20, 60, batch)
  counts[0] = 0
  base = {"logits": rng.normal(size=(S, batch, N, C)).astype(np.float32),
          "boxes": boxes.astype(np.float32)}
  targets = {
      "gt_boxes": np.concatenate([gxy, gxy + rng.uniform(8, 240, (batch, M, 2))],
                                 -1).astype(np.float32),
      "gt_labels": rng.integers(0, C, (batch, M)).astype(np.int32),
      "gt_mask": np.arange(M)[None, :] < counts[:, None],
      "image_whwh": whwh}
  return base, targets


def program_summary(hlo: str) -> dict:
  """The per-device program's all-gathers, host callbacks, and collectives of the matching
  (a matcher left to the jit to partition would all-reduce each while loop's condition)."""
  collective = re.compile(r"\b(all-reduce|all-gather|all-to-all|collective-permute|"
                          r"reduce-scatter)(-start)?\(")
  lines = hlo.splitlines()
  return {"all_gathers": hlo.count("all-gather-start(") + hlo.count("all-gather("),
          "callbacks": hlo.count('custom_call_target="xla_ffi_python_cpu_callback"'),
          "matching_collectives": sum(1 for line in lines
                                      if collective.search(line) and "/matching/" in line)}


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--mode", choices=("devices", "processes"), required=True)
  parser.add_argument("--matcher", default="scipy", help="config.loss.matcher")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--window", type=int, default=8)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--num-processes", type=int, default=2)
  parser.add_argument("--dump-after", type=float, default=0.0,
                      help="print every thread's Python stack after this many seconds")
  args = parser.parse_args()
  if args.dump_after:
    faulthandler.dump_traceback_later(args.dump_after, exit=False)

  if args.mode == "processes":   # before anything touches a device
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                               num_processes=args.num_processes, process_id=args.process_id)

  config = ml_collections.ConfigDict(dict(class_weight=2.0, l1_weight=5.0, giou_weight=2.0,
                                          focal_alpha=0.25, focal_gamma=2.0,
                                          matcher=args.matcher))
  devices = jax.devices()
  batch = len(devices) * BATCH_PER_DEVICE
  base, targets = make_problem(batch)
  mesh = Mesh(np.array(devices), ("data",))

  def loss_fn(params, base, targets, mesh):
    logits = base["logits"] * params["scale"]
    boxes = base["boxes"] + params["shift"]
    return losses.set_prediction_loss(logits, boxes, targets, config, mesh=mesh)[0]

  def step(params, base, targets, mesh):
    loss, grads = jax.value_and_grad(loss_fn)(params, base, targets, mesh)
    return loss, grads, jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)

  replicated = NamedSharding(mesh, P())
  split_base = NamedSharding(mesh, P(None, "data"))
  split_targets = NamedSharding(mesh, P("data"))
  sharded_step = jax.jit(lambda p, b, t: step(p, b, t, mesh),
                         out_shardings=(replicated, replicated, replicated))
  local_step = jax.jit(lambda p, b, t: step(p, b, t, None)[:2])
  on_one_device = lambda tree: jax.device_put(tree, jax.local_devices()[0])

  def global_array(x, sharding, axis):
    """This process's slice of the global batch, as one global array."""
    rows = np.array_split(np.arange(x.shape[axis]), jax.process_count())[jax.process_index()]
    return jax.make_array_from_process_local_data(sharding, np.take(x, rows, axis=axis),
                                                  x.shape)

  g_base = {k: global_array(v, split_base, 1) for k, v in base.items()}
  g_targets = {k: global_array(v, split_targets, 0) for k, v in targets.items()}
  params = {"scale": np.ones((C,), np.float32), "shift": np.zeros((4,), np.float32)}
  params = jax.device_put(params, replicated)
  hlo = sharded_step.lower(params, g_base, g_targets).compile().as_text()
  program = program_summary(hlo)

  worst, start = 0.0, time.perf_counter()
  for first in range(0, args.steps, args.window):
    window = []
    for _ in range(min(args.window, args.steps - first)):
      loss, grads, new_params = sharded_step(params, g_base, g_targets)
      window.append((params, loss, grads))
      params = new_params
    for used, loss, grads in window:
      used = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), used)
      want_loss, want_grads = jax.device_get(local_step(*on_one_device((used, base, targets))))
      got_loss = float(loss.addressable_data(0))
      got_grads = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), grads)
      errors = [abs(got_loss - float(want_loss)) / abs(float(want_loss))]
      errors += [float(np.abs(got_grads[k] - want_grads[k]).max() /
                       max(np.abs(want_grads[k]).max(), 1e-12)) for k in want_grads]
      worst = max(worst, *errors)
  ok = worst < 1e-5
  print(json.dumps({"mode": args.mode, "process": jax.process_index(), "devices": len(devices),
                    "steps": args.steps, "worst_relative_error": worst, "ok": ok, **program,
                    "seconds": round(time.perf_counter() - start, 2)}), flush=True)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
