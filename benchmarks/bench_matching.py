"""The Hungarian matching's share of a training step of the dynamic head.

  python benchmarks/bench_matching.py                       # tiny and R-50 100/300-proposal heads
  python benchmarks/bench_matching.py --heads tiny --batch 4

A step is the head's forward on random FPN maps, the set-prediction loss and the gradient of
both parameters and maps (the backbone would come on top, so shares are upper bounds). It is
timed with the scipy matcher and with a stand-in that makes no callback (a greedy argmin on
the device): the difference is what the callback costs the step, including any lost overlap.
Steps are interleaved and the fastest of each kept, which other load disturbs least; on a
busy shared machine, differences of a few percent of a full-size step are within noise.
Also timed: the matching alone (one jitted `scipy_match` on cost blocks of the step's
shape: transfers, callback and solve) and the host solver's own time in the step's callback.
"""
import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import common  # pylint: disable=g-import-not-at-top
from configs import r50_100pro_3x, r50_300pro_3x, tiny
from sparse_rcnn_jax.model.dynamic_head import DynamicHead
from sparse_rcnn_jax.model.head_config import HeadConfig
from sparse_rcnn_jax.training import losses
from sparse_rcnn_jax.training import matcher

HEADS = {  # config, training image (h, w) at the largest scale
    "tiny": (tiny, (128, 160)),
    "r50_100pro": (r50_100pro_3x, (800, 1216)),
    "r50_300pro": (r50_300pro_3x, (800, 1216)),
}
BOXES_PER_IMAGE = 7   # COCO's mean


def greedy_assignment(costs, gt_mask):
  """Baseline with no host round trip: each slot takes its cheapest proposal (not one-to-one,
  so not a matcher to train with; it keeps the cost computation in the step)."""
  return jnp.argmin(costs, axis=-2).astype(jnp.int32), gt_mask


def make_inputs(cfg: HeadConfig, hw: tuple[int, int], batch: int, max_boxes: int, seed=0):
  rng = np.random.default_rng(seed)
  h, w = hw
  features = [jnp.asarray(rng.normal(size=(batch, -(-h // s), -(-w // s), cfg.hidden_dim)),
                          jnp.float32) for s in (4, 8, 16, 32)]
  xy = rng.uniform(0, 0.7, (batch, max_boxes, 2)) * (w, h)
  wh = rng.uniform(0.05, 0.3, (batch, max_boxes, 2)) * (w, h)
  targets = {"gt_boxes": np.concatenate([xy, xy + wh], -1).astype(np.float32),
             "gt_labels": rng.integers(0, cfg.num_classes, (batch, max_boxes)).astype(np.int32),
             "gt_mask": np.arange(max_boxes)[None] < BOXES_PER_IMAGE,
             "image_whwh": np.tile(np.array([[w, h, w, h]], np.float32), (batch, 1))}
  return features, targets


class SolveTimer:
  """Stands in for matcher.solve_assignments, adding up the host solver's time per call."""

  def __init__(self, solve):
    self.solve, self.seconds, self.calls = solve, 0.0, 0

  def __call__(self, costs, gt_mask):
    start = time.perf_counter()
    out = self.solve(costs, gt_mask)
    self.seconds += time.perf_counter() - start
    self.calls += 1
    return out


def _with_matcher(loss_config, name: str):
  out = loss_config.copy_and_resolve_references()
  out.matcher = name
  return out


def bench(name: str, batch: int, repeats: int) -> dict:
  module, hw = HEADS[name]
  config = module.get_config()
  cfg = HeadConfig.from_config(config.model)
  max_boxes = config.data.max_boxes
  features, targets = make_inputs(cfg, hw, batch, max_boxes)
  whwh = jnp.asarray(targets["image_whwh"])
  head = DynamicHead(cfg)
  params = jax.jit(head.init)(jax.random.PRNGKey(0), features, whwh)["params"]

  def compile_step(matcher_name: str):
    loss_config = _with_matcher(config.loss, matcher_name)

    def total(params, features):
      out = head.apply({"params": params}, features, whwh)
      return losses.set_prediction_loss(out["pred_logits"], out["pred_boxes"], targets,
                                        loss_config)[0]

    start = time.perf_counter()
    step = jax.jit(jax.value_and_grad(total, argnums=(0, 1))).lower(params, features).compile()
    jax.block_until_ready(step(params, features))
    return step, time.perf_counter() - start

  def seconds(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start

  solve = matcher.solve_assignments
  matcher.MATCHERS["greedy"] = greedy_assignment
  matcher.solve_assignments = timer = SolveTimer(solve)
  try:
    no_callback, _ = compile_step("greedy")
    with_callback, compile_s = compile_step("scipy")
    timer.seconds, timer.calls = 0.0, 0
    # Interleaved, fastest kept: the run least disturbed by other load.
    steps = np.array([(seconds(with_callback, params, features),
                       seconds(no_callback, params, features)) for _ in range(repeats)])
    step_s, no_callback_s = steps.min(axis=0)
    solve_s = timer.seconds / timer.calls   # one solve per step
    costs = jax.random.normal(jax.random.PRNGKey(1),
                              (batch, cfg.num_stages, cfg.num_proposals, max_boxes))
    mask = np.broadcast_to(targets["gt_mask"][:, None], costs.shape[:2] + (max_boxes,))
    match_alone = jax.jit(matcher.scipy_match)
    for _ in range(2):   # the first call after a large step also pays for that step's teardown
      jax.block_until_ready(match_alone(costs, mask))
    match_s = min(seconds(match_alone, costs, mask) for _ in range(repeats))
  finally:
    matcher.solve_assignments = solve
    del matcher.MATCHERS["greedy"]
  callback_s = step_s - no_callback_s
  cost_mb = cfg.num_stages * batch * cfg.num_proposals * max_boxes * 4 / 2**20
  return {"head": name, "stages": cfg.num_stages, "proposals": cfg.num_proposals,
          "batch": batch, "gt_slots": max_boxes, "cost_MB": cost_mb, "compile_s": compile_s,
          "step_ms": 1e3 * step_s, "no_callback_ms": 1e3 * no_callback_s,
          "callback_ms": 1e3 * callback_s, "callback_share": callback_s / step_s,
          "match_alone_ms": 1e3 * match_s, "match_alone_share": match_s / step_s,
          "host_solve_ms": 1e3 * solve_s, "host_solve_share": solve_s / step_s}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--heads", nargs="+", default=["tiny", "r50_100pro", "r50_300pro"],
                      choices=sorted(HEADS))
  parser.add_argument("--batch", type=int, default=2, help="images per device (official: 2)")
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  rows = [bench(h, args.batch, args.repeats) for h in args.heads]
  common.report("matching", rows, ["head", "stages", "proposals", "batch", "gt_slots",
                                   "cost_MB", "step_ms", "no_callback_ms", "callback_ms",
                                   "callback_share", "match_alone_ms", "match_alone_share",
                                   "host_solve_ms", "host_solve_share"])


if __name__ == "__main__":
  main()
