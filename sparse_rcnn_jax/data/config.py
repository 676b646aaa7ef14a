"""The data section of an experiment config: `config.data = data_config.default_config()`.

Fields (override any on the command line, e.g. `--config.data.batch_size=8`):
  source: "coco" (a COCO-format folder), "tfds" (a TensorFlow Datasets dataset) or
    "synthetic" (the embedded set, generated under data.synthetic.root: configs/synthetic.py);
    pipeline.SOURCES lists them.
  coco_root: for "coco", a folder laid out one of the usual ways (data/layout.py: the
    annotations/ + images/ layout, COCO's own names, Roboflow's export); its splits are found
    there. One flag for one's own dataset (configs/custom.py).
  train_ann, train_images, eval_ann, eval_images: for "coco", the instances json and the image
    folder of each split; set, they override what coco_root finds, split by split.
  tfds_name, tfds_data_dir, train_split, eval_split: for "tfds", e.g. "coco/2017" with splits
    "train" / "validation", or "coco_folder/<name>" as built by `tfds.build_coco_folder`;
    an empty tfds_data_dir means TFDS's default (~/tensorflow_datasets).
  train_scales: short sides, one drawn per training image (480..800 step 32).
  max_size: the longest side after resizing (1333).
  test_scale: the short side for evaluation (800).
  flip_prob: horizontal flip probability in training (0.5).
  crop: the 300-proposal recipe's random crop; crop_prob (0.5), crop_scales (short sides before
    cropping, (400, 500, 600)), crop_size (absolute crop side range, (384, 600)).
  buckets: the (H, W) shapes batches are padded to, multiples of 32; empty means the rule of
    `batching.default_buckets` (at most three shapes per split). `pipeline.batch_shapes` lists
    what a config compiles.
  group_by_aspect: put images of one orientation in one batch, so most batches use the smaller
    landscape or portrait bucket (needs image sizes known before decoding: COCO folders and
    TFDS sets built by `tfds.build_coco_folder`).
  max_boxes: ground-truth slots per image (M in gt_boxes [B, M, 4]).
  batch_size, eval_batch_size: global batch sizes; each divides by the number of hosts.
  num_workers: grain worker processes per host; 0 decodes in threads of the main process.
  read_threads: threads decoding batches concurrently (in each worker, or in the main process).
  prefetch: batches buffered ahead (per worker, and by the threads).
  on_bad_image: "skip" (default: log, count, leave an empty slot) or "error" for files that are
    missing, corrupt, truncated or of the wrong size.
  on_bad_annotation: "error" (default: fail listing every bad annotation) or "skip" (drop them,
    clip boxes crossing the border, and count).
  check: how COCO image files are checked before the first step: "headers" (default: size,
    EXIF orientation, truncation, from headers and file ends), "decode" (decode every image
    too), "off" (existence only). `python -m sparse_rcnn_jax.data.check` runs it alone.
  allow_empty_train: a training split without any box is an error unless this is True.
  seed: shuffling and augmentation seed; a given seed gives the same batches every run.
"""
import ml_collections


def default_config() -> ml_collections.ConfigDict:
  """The official recipe's data settings (docs/model.md, section 1); paths are left empty."""
  return ml_collections.ConfigDict({
      "source": "coco",
      "coco_root": "",
      "train_ann": "",
      "train_images": "",
      "eval_ann": "",
      "eval_images": "",
      "tfds_name": "",
      "tfds_data_dir": "",
      "train_split": "train",
      "eval_split": "validation",
      "train_scales": tuple(range(480, 801, 32)),
      "max_size": 1333,
      "test_scale": 800,
      "flip_prob": 0.5,
      "crop": False,
      "crop_prob": 0.5,
      "crop_scales": (400, 500, 600),
      "crop_size": (384, 600),
      "buckets": (),
      "group_by_aspect": True,
      "max_boxes": 100,
      "batch_size": 16,
      "eval_batch_size": 16,
      "num_workers": 4,
      "read_threads": 4,
      "prefetch": 2,
      "on_bad_image": "skip",
      "on_bad_annotation": "error",
      "check": "headers",
      "allow_empty_train": False,
      "seed": 0,
  })
