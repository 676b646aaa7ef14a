"""Detects objects in image files with a trained Sparse R-CNN and draws them.

  python predict.py --workdir workdirs/synthetic --images data_cache/synthetic/images/val \
      --out predictions/

Only the workdir of a training run is needed: its saved config and dataset info give the
model, the test resize and the class names (--config overrides them). Images are read through
the same test transform, padding buckets and loader as evaluation, so the predict function
compiles once per bucket, not once per image size. For each image: NAME.png with labelled
boxes (scores >= --threshold, or the 3 best, dashed, when none reaches it; the threshold is for
drawing only), NAME_stages.png with the learned proposals and each stage's boxes (like the
paper's Figure 4), both enlarged to a short side of at least 480 px, and one detections.json
with every detection of every image.
"""
import json
import pathlib

import numpy as np
from absl import app
from absl import flags

from sparse_rcnn_jax import cli

_RUN = cli.define_run_flags()
_IMAGES = flags.DEFINE_list("images", None, "Image files and/or folders of images.")
_OUT = flags.DEFINE_string("out", "predictions", "Output folder.")
_THRESHOLD = flags.DEFINE_float("threshold", None, "Minimum score of a drawn box "
                                 "(default: the config's display_threshold).")
flags.mark_flags_as_required(["workdir", "images"])

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def image_paths(items: list[str]) -> list[pathlib.Path]:
  """Files as given, and the images inside folders (sorted)."""
  paths = []
  for item in items:
    path = pathlib.Path(item)
    if path.is_dir():
      paths += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif path.is_file():
      paths.append(path)
    else:
      raise app.UsageError(f"No such image file or folder: {path}")
  if not paths:
    raise app.UsageError(f"No images found in {items}")
  return paths


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top
  import jax
  from sparse_rcnn_jax import device_batches, sharding
  from sparse_rcnn_jax.evaluation import inference, visualize
  from sparse_rcnn_jax.data import image_files, pipeline, source as source_lib

  cli.setup_logging()
  paths = image_paths(_IMAGES.value)
  mesh = sharding.make_mesh(jax.devices()[:1])
  try:
    run = _RUN.load(mesh)
  except (FileNotFoundError, ValueError) as error:
    raise app.UsageError(str(error)) from error
  config, info, model, variables, step = run.config, run.info, run.model, run.variables, run.step
  predict_fn = inference.make_predict_fn(model, mesh)
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  threshold = config.display_threshold if _THRESHOLD.value is None else _THRESHOLD.value
  source = image_files.ImageFilesSource(paths, info)
  records = []
  for batch in pipeline.eval_iterator(config.data, source,
                                      size_divisibility=model.backbone.size_divisibility):
    dets = jax.device_get(predict_fn(variables, device_batches.make_global_batch(batch, mesh)))
    for i in np.flatnonzero(batch["valid"]):
      path = paths[int(batch["image_id"][i])]
      one = {k: v[i] for k, v in dets.items()}
      visualize.save_prediction(source_lib.decode_image(path), one, info.class_names,
                                out / path.stem, threshold)
      keep = one["valid"]
      records += [{"file": str(path), "box_xyxy": [round(float(v), 2) for v in box],
                   "score": float(score), "label": int(label),
                   "class": info.class_names[int(label)]}
                  for box, score, label in zip(one["boxes"][keep], one["scores"][keep],
                                               one["labels"][keep])]
  (out / "detections.json").write_text(json.dumps(records, indent=1))
  print(f"Checkpoint step {step}: {len(paths)} image(s), {len(records)} detections -> {out}")


if __name__ == "__main__":
  app.run(main)
