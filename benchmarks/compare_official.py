"""Ours against the official PyTorch code, row by row, at the official timing harness's shapes.

  python benchmarks/compare_official.py                   # our rows only
  SPARSERCNN_MIRROR=<git dir of PeizeSun/SparseR-CNN> \
  python benchmarks/compare_official.py --torch-python /tmp/reftorch/bin/python --rounds 2

Shapes (those of the harness in shared/official_timing): batch 1, one 800x1216 image, R-50 FPN
(frozen batch norm, stem and res2 frozen), the official 100-proposal head (80 classes, 6
stages, hidden 256, RoIAlign 7x7 with 2x2 samples), random FPN maps, proposals spread over the
image, 7 fixed ground-truth boxes. Rows:

  head_fwd       the dynamic head's forward from the FPN maps
  pooler_fwd     one RoIAlign call: 100 boxes over P2-P5
  backbone_fwd   ResNet-50 + FPN forward
  inference      the whole model's forward (official: backbone_fwd + head_fwd)
  head_fwd_bwd   head forward + 6 matchings + loss + gradient of the head's parameters
  model_train    the same fed by ResNet-50 + FPN, gradient of every trainable parameter

With --torch-python (a Python with torch, see shared/official_timing/README.md) and
$SPARSERCNN_MIRROR, the official harness runs too, alternating with ours for --rounds rounds;
each row keeps its best median, and the table gives ratio = ours / official.
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import common  # pylint: disable=g-import-not-at-top
from configs import r50_100pro_3x
from sparse_rcnn_jax import xla_cpu
from sparse_rcnn_jax.model import box_ops, detector
from sparse_rcnn_jax.model.dynamic_head import DynamicHead
from sparse_rcnn_jax.model.fpn import FPN
from sparse_rcnn_jax.model.roi_align import multilevel_roi_align
from sparse_rcnn_jax.training import losses

HARNESS = common.SHARED / "official_timing"
IMAGE_HW = (800, 1216)
# The harness's ground truth (xyxy, input pixels) and labels.
GT_BOXES = [[100.0, 120.0, 400.0, 500.0], [600.5, 200.25, 1100.0, 760.0],
            [20.0, 20.0, 90.0, 70.0], [500.0, 400.0, 660.0, 520.0],
            [800.0, 50.0, 1200.0, 300.0], [300.0, 600.0, 420.0, 790.0],
            [1000.0, 650.0, 1050.0, 700.0]]
GT_LABELS = [1, 3, 0, 17, 56, 2, 79]
ROWS = ("head_fwd", "pooler_fwd", "backbone_fwd", "inference", "head_fwd_bwd", "model_train")


def spread_proposals(num: int, seed: int = 77) -> np.ndarray:
  """[N, 4] normalized cxcywh as the harness spreads them: centres U(0.05, 0.95), sides
  log-uniform in [0.03, 1]; proposals 0 and 1 keep the whole image."""
  rng = np.random.default_rng(seed)
  cxcy = rng.uniform(0.05, 0.95, (num, 2))
  wh = np.exp(rng.uniform(np.log(0.03), 0.0, (num, 2)))
  boxes = np.concatenate([cxcy, wh], 1).astype(np.float32)
  boxes[:2] = (0.5, 0.5, 1.0, 1.0)
  return boxes


class Ours:
  """Our side of every row, compiled once."""

  def __init__(self, ynnpack: bool, rows=ROWS):
    config = r50_100pro_3x.get_config()
    self.loss_config = config.loss
    self.model = detector.build_model(config.model)
    cfg = self.model.head
    h, w = IMAGE_HW
    rng = np.random.default_rng(1234)
    self.levels = self.model.backbone.levels
    self.maps = [jnp.asarray(rng.standard_normal((1, h >> l, w >> l, cfg.hidden_dim)),
                             jnp.float32) for l in self.levels]
    self.image = jnp.asarray(rng.integers(0, 256, (1, h, w, 3)), jnp.uint8)
    self.whwh = jnp.array([[w, h, w, h]], jnp.float32)
    m = len(GT_BOXES)
    self.targets = {"gt_boxes": jnp.array([GT_BOXES]), "gt_labels": jnp.array([GT_LABELS]),
                    "gt_mask": jnp.ones((1, m), bool), "image_whwh": self.whwh}
    variables = jax.jit(self.model.init)(jax.random.PRNGKey(0), self.image, self.whwh)
    params = variables["params"]
    params["head"]["proposal_boxes"] = jnp.asarray(spread_proposals(cfg.num_proposals))
    self.variables = {"params": params, "batch_stats": variables["batch_stats"]}
    # The model's own parts, for the rows that run one of them alone.
    model = self.model
    self.head = DynamicHead(cfg, self.levels)
    self.boxes = box_ops.cxcywh_to_xyxy(params["head"]["proposal_boxes"])[None] * self.whwh
    self.backbone = model.backbone
    self.fpn = FPN(cfg.hidden_dim, self.levels, conv_impl=model.conv_impl)
    self.options = xla_cpu.compiler_options(ynnpack)
    self.fns = self._compile(rows)

  def _loss(self, out):
    return losses.set_prediction_loss(out["pred_logits"], out["pred_boxes"], self.targets,
                                      self.loss_config)[0]

  def _compile(self, rows) -> dict:
    head_params = self.variables["params"]["head"]
    stats = self.variables["batch_stats"]

    def head_fwd(p, maps):
      return self.head.apply({"params": p}, maps, self.whwh)

    def pooler_fwd(maps, boxes):
      return multilevel_roi_align(maps, boxes, levels=self.levels)[0]

    def backbone_fwd(v, image):
      features = self.backbone.apply({"params": v["params"]["backbone"],
                                      "batch_stats": v["batch_stats"]["backbone"]},
                                     detector.normalize_images(image, self.backbone.pixel_mean,
                                                               self.backbone.pixel_std))
      return self.fpn.apply({"params": v["params"]["fpn"]}, features)

    def inference(v, image):
      return self.model.apply(v, image, self.whwh)

    def head_train(p, maps):
      return jax.grad(lambda p: self._loss(self.head.apply({"params": p}, maps, self.whwh)))(p)

    def model_train(p, image):
      return jax.grad(lambda p: self._loss(
          self.model.apply({"params": p, "batch_stats": stats}, image, self.whwh,
                           deterministic=False)))(p)

    params = self.variables["params"]
    calls = {
        "head_fwd": (head_fwd, (head_params, self.maps)),
        "pooler_fwd": (pooler_fwd, (self.maps, self.boxes)),
        "backbone_fwd": (backbone_fwd, (self.variables, self.image)),
        "inference": (inference, (self.variables, self.image)),
        "head_fwd_bwd": (head_train, (head_params, self.maps)),
        "model_train": (model_train, (params, self.image)),
    }
    fns = {}
    for name in rows:
      fn, args = calls[name]
      start = time.perf_counter()
      compiled = jax.jit(fn, compiler_options=self.options).lower(*args).compile()
      jax.block_until_ready(compiled(*args))   # warm-up
      fns[name] = (compiled, args, time.perf_counter() - start)
    return fns

  def time_rows(self, reps: int) -> dict[str, float]:
    """Median seconds of each row over `reps` calls."""
    out = {}
    for name in self.fns:
      compiled, args, _ = self.fns[name]
      times = []
      for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
      out[name] = statistics.median(times)
    return out


def run_official(python: str, reps: int) -> dict[str, float]:
  """Median seconds of each official row (the harness in a subprocess)."""
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "official.json"
    subprocess.run([python, "time_reference.py", "--reps", str(reps), "--model-train",
                    "--json", str(path)], cwd=HARNESS, check=True, stdout=subprocess.DEVNULL)
    rows = {k: v["median_s"] for k, v in json.loads(path.read_text())["rows"].items()}
  if "backbone_fwd" in rows:
    rows["inference"] = rows["backbone_fwd"] + rows["head_fwd"]
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=5, help="timed calls per row and round")
  parser.add_argument("--rounds", type=int, default=2,
                      help="ours / official alternations; each row keeps its best median")
  parser.add_argument("--torch-python", default=os.environ.get("OFFICIAL_TORCH_PYTHON", ""),
                      help="a Python with torch for the official harness (omit: ours only)")
  parser.add_argument("--ynnpack", action="store_true",
                      help="leave XLA:CPU's YNNPACK fusions on (jaxlib's default)")
  args = parser.parse_args()
  official = bool(args.torch_python)
  if official and not (os.environ.get("SPARSERCNN_MIRROR") and HARNESS.is_dir()):
    sys.exit(f"The official rows need $SPARSERCNN_MIRROR (a git dir of PeizeSun/SparseR-CNN) "
             f"and the harness at {HARNESS}.")

  ours = Ours(args.ynnpack)
  best_ours, best_official = {}, {}
  for _ in range(args.rounds):
    for name, s in ours.time_rows(args.reps).items():
      best_ours[name] = min(s, best_ours.get(name, np.inf))
    if official:
      for name, s in run_official(args.torch_python, args.reps).items():
        best_official[name] = min(s, best_official.get(name, np.inf))

  rows = []
  for name in ROWS:
    row = {"row": name, "ours_s": best_ours[name], "compile_s": ours.fns[name][2]}
    if name in best_official:
      row["official_s"] = best_official[name]
      row["ratio"] = best_ours[name] / best_official[name]
    rows.append(row)
  columns = ["row", "ours_s", "official_s", "ratio", "compile_s"]
  path = common.report("compare_official", rows, columns)
  data = json.loads(path.read_text())
  data.update(reps=args.reps, rounds=args.rounds, ynnpack=args.ynnpack,
              image_hw=list(IMAGE_HW), official=official)
  path.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
  main()
