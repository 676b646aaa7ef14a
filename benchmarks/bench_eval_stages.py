"""Speed against AP per number of head stages, from one trained run (model.eval_stages).

  python benchmarks/bench_eval_stages.py --workdir workdirs/bccd

For k = 1..S: the COCO AP of stage k's detections on the run's eval split (one pass of
inference.evaluate_stages; they equal eval.py --config.model.eval_stages=k's), and the time of
the predict function that stops after stage k (model.eval_stages=k) on batches of 1 and 8
images at the run's padded test size (random pixels: speed does not depend on them),
compilation excluded.
"""
import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import common  # pylint: disable=g-import-not-at-top
from sparse_rcnn_jax import sharding
from sparse_rcnn_jax.data import pipeline
from sparse_rcnn_jax.evaluation import inference
from sparse_rcnn_jax.evaluation import serving
from sparse_rcnn_jax.model import detector
from sparse_rcnn_jax.training import model_state


def _batch(batch: int, height: int, width: int) -> dict:
  rng = np.random.default_rng(0)
  return {"image": jnp.asarray(rng.integers(0, 256, (batch, height, width, 3), np.uint8)),
          "image_whwh": jnp.tile(jnp.array([[width, height, width, height]], jnp.float32),
                                 (batch, 1)),
          "orig_size": jnp.tile(jnp.array([[height, width]], jnp.int32), (batch, 1))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  mesh = sharding.make_mesh(jax.devices()[:1])
  run = model_state.load_run(args.workdir, mesh=mesh)
  config, model, variables = run.config, run.model, run.variables
  multiple = model.backbone.size_divisibility
  source = pipeline.load_source(config.data, "eval")
  per_stage = inference.evaluate_stages(inference.make_stages_predict_fn(model, mesh),
                                        variables, config, mesh, source,
                                        size_divisibility=multiple)
  height, width = serving.default_image_size(config.data, multiple)
  rows = []
  for k, metrics in enumerate(per_stage, 1):
    early = detector.build_model(ml_collections.ConfigDict(
        {**config.model.to_dict(), "eval_stages": k}), run.info.num_classes)
    predict_fn = inference.make_predict_fn(early, mesh)
    row = {"stages": k, "AP": 100 * metrics["AP"], "AP50": 100 * metrics["AP50"],
           "AP75": 100 * metrics["AP75"], "image": f"{height}x{width}"}
    for batch in args.batches:
      inputs = _batch(batch, height, width)
      _, seconds, _ = common.time_compiled(predict_fn, variables, inputs, repeats=args.repeats)
      row[f"ms_per_image_b{batch}"] = 1e3 * seconds / batch
    rows.append(row)
  common.report("eval_stages", rows, ["stages", "AP", "AP50", "AP75", "image"]
                + [f"ms_per_image_b{b}" for b in args.batches],
                details=[{"workdir": str(pathlib.Path(args.workdir).resolve()),
                          "step": run.step, "num_images": per_stage[0]["num_images"]}])


if __name__ == "__main__":
  main()
