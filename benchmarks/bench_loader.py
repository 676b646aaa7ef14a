"""Training-loader throughput (images/s) on BCCD with 0 and 2 grain worker processes.

  python benchmarks/bench_loader.py                      # full recipe, workers 0 and 2
  python benchmarks/bench_loader.py --workers 0 2 4 --batches 40

The official training recipe (flip, short side 480..800, long side <= 1333) on the 640x480
BCCD photos; decoding, augmentation and padding to the bucket, no model. BCCD is read from
$SPARSE_RCNN_SHARED/data/bccd (default ../shared/data/bccd). The first batch (worker start-up)
is timed separately from the steady state.
"""
import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import common  # pylint: disable=g-import-not-at-top
from sparse_rcnn_jax.data import config as data_config
from sparse_rcnn_jax.data import pipeline

BCCD = common.SHARED / "data" / "bccd"


def bench(workers: int, batch_size: int, batches: int, read_threads: int, crop: bool) -> dict:
  config = data_config.default_config()
  config.update({"train_ann": str(BCCD / "instances_trainval.json"),
                 "train_images": str(BCCD / "JPEGImages"), "batch_size": batch_size,
                 "num_workers": workers, "read_threads": read_threads, "crop": crop})
  source = pipeline.load_source(config, "train")
  start = time.perf_counter()
  iterator = pipeline.train_iterator(config, source, size_divisibility=32)  # every backbone's
  next(iterator)
  first_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(iterator)
  steady_s = time.perf_counter() - start
  shape = "x".join(map(str, batch["image"].shape[1:3]))
  iterator.close()
  return {"workers": workers, "read_threads": read_threads, "batch": batch_size, "crop": crop,
          "batches": batches, "padded_shape": shape, "first_batch_s": first_s,
          "images_per_s": batches * batch_size / steady_s,
          "ms_per_batch": 1e3 * steady_s / batches}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--batches", type=int, default=25)
  parser.add_argument("--read_threads", type=int, default=2)
  parser.add_argument("--crop", action="store_true", help="the 300-proposal recipe's crop")
  args = parser.parse_args()
  if not BCCD.exists():
    sys.exit(f"{BCCD} not found: set SPARSE_RCNN_SHARED")
  rows = [bench(w, args.batch_size, args.batches, args.read_threads, args.crop)
          for w in args.workers]
  common.report("loader", rows, ["workers", "read_threads", "batch", "crop", "padded_shape",
                                 "first_batch_s", "images_per_s", "ms_per_batch"])


if __name__ == "__main__":
  main()
