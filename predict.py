"""Detects objects in image files with a trained Sparse R-CNN and draws them.

  python predict.py --config configs/synthetic.py --workdir workdirs/synthetic \
      --images data_cache/synthetic/images/val --out predictions/

For each image: NAME.png with labelled boxes (scores >= --threshold; the threshold is for
drawing only), NAME_stages.png with the learned proposals and each stage's boxes (like the
paper's Figure 4), and one detections.json with every detection of every image.
"""
import json
import logging
import pathlib

import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_IMAGES = flags.DEFINE_list("images", None, "Image files and/or folders of images.")
_OUT = flags.DEFINE_string("out", "predictions", "Output folder.")
_THRESHOLD = flags.DEFINE_float("threshold", None, "Minimum score of a drawn box "
                                 "(default: the config's display_threshold).")
flags.mark_flags_as_required(["config", "workdir", "images"])

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
  from sparse_rcnn_jax import cli, detector, experiment, inference, sharding, trainer, visualize
  from sparse_rcnn_jax.data import batching, pipeline, source as source_lib, transforms

  cli.setup_logging()
  config = _CONFIG.value
  paths = image_paths(_IMAGES.value)
  experiment.prepare_data(config)
  dataset = pipeline.load_source(config.data, "eval" if experiment.has_eval_split(config)
                                 else "train")
  trainer.match_dataset(config, dataset)
  mesh = sharding.make_mesh(jax.devices()[:1])
  variables, step = trainer.restore_variables(config, _WORKDIR.value, mesh, _STEP.value)
  predict_fn = inference.make_predict_fn(detector.build_model(config.model), mesh)
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  threshold = config.display_threshold if _THRESHOLD.value is None else _THRESHOLD.value
  records = []
  for path in paths:
    try:
      image = source_lib.decode_image(path)
    except source_lib.BadImageError as e:
      logging.warning("Skipping %s", e)
      continue
    h, w = (int(v) for v in transforms.resized_shape(*image.shape[:2], config.data.test_scale,
                                                      config.data.max_size))
    resized, _ = transforms.resize(image, np.zeros((0, 4), np.float32), h, w)
    example = source_lib.Example(resized, np.zeros((0, 4), np.float32), np.zeros(0, np.int32),
                                 0, image.shape[:2])
    batch = batching.collate([example], (batching.round_up(h), batching.round_up(w)), 1)
    dets = jax.device_get(predict_fn(variables, pipeline.make_global_batch(batch, mesh)))
    dets = {k: v[0] for k, v in dets.items()}
    keep = dets["valid"]
    picture = visualize.draw_detections(image, dets["boxes"][keep], dets["scores"][keep],
                                        dets["labels"][keep], dataset.class_names,
                                        score_threshold=threshold)
    visualize.save_png(picture, out / f"{path.stem}.png")
    scores = np.concatenate([np.ones((1, dets["stage_scores"].shape[-1])),
                             dets["stage_scores"]])
    strip = visualize.draw_stages(image, dets["stage_boxes"], scores,
                                  score_threshold=threshold)
    visualize.save_png(strip, out / f"{path.stem}_stages.png")
    records += [{"file": str(path), "box_xyxy": [round(float(v), 2) for v in box],
                 "score": float(score), "label": int(label),
                 "class": dataset.class_names[int(label)]}
                for box, score, label in zip(dets["boxes"][keep], dets["scores"][keep],
                                             dets["labels"][keep])]
  (out / "detections.json").write_text(json.dumps(records, indent=1))
  print(f"Checkpoint step {step}: {len(paths)} image(s), {len(records)} detections -> {out}")


if __name__ == "__main__":
  app.run(main)
