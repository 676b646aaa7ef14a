"""Exports a trained Sparse R-CNN as one self-contained model that runs without this package.

  python export.py --workdir workdirs/synthetic --out model.jaxexport
  python export.py --workdir workdirs/r50 --out r50.jaxexport --batch 8 --platforms cuda
  python export.py --workdir workdirs/synthetic --format onnx --out model.onnx

Writes OUT, the whole inference (uint8 RGB images [B, H, W, 3] zero-padded bottom/right, and
image_whwh [B, 4] float32 (w, h, w, h) of each unpadded image -> "scores" [B, K], "labels"
[B, K], "boxes" [B, K, 4] absolute xyxy in input pixels) with the weights inside, and OUT.json
beside it (model.jaxexport.json): the class name and category id of each label, the input
contract and the model dtype.

--format jax (the default): serialized by jax.export (sparse_rcnn_jax/evaluation/serving.py
says why); any process with jax runs it:

  exp = jax.export.deserialize(bytearray(open("model.jaxexport", "rb").read()))
  out = exp.call(images, image_whwh)

--format onnx: an ONNX model (sparse_rcnn_jax/evaluation/onnx_export.py; float32 models; needs
`pip install --no-deps -r requirements-export.txt`); onnxruntime runs it without JAX:

  scores, labels, boxes = onnxruntime.InferenceSession("model.onnx").run(
      ["scores", "labels", "boxes"], {"images": images, "image_whwh": image_whwh})

The batch is symbolic (any size) unless --batch fixes it. H and W default to the padded size
of the run's evaluation (config.data.test_scale x max_size rounded up to multiples of the
backbone's size_divisibility, 32 for every backbone here) and must be multiples of it.
--platforms lowers a jax artifact for other platforms than this machine's (cpu, cuda, rocm,
tpu); the run's --config can be overridden as in predict.py.
"""
import json
import pathlib

from absl import app
from absl import flags

from sparse_rcnn_jax import cli

_RUN = cli.define_run_flags()
_OUT = flags.DEFINE_string("out", None, "The artifact to write; OUT.json goes beside it.")
_HEIGHT = flags.DEFINE_integer("height", None, "Padded image height, a multiple of 32 (the "
                               "backbone's size_divisibility) "
                               "(default: from config.data.test_scale / max_size).")
_WIDTH = flags.DEFINE_integer("width", None, "Padded image width, a multiple of 32 (the "
                              "backbone's size_divisibility) "
                              "(default: from config.data.test_scale / max_size).")
_BATCH = flags.DEFINE_integer("batch", None, "A fixed batch size (default: symbolic, any).")
_PLATFORMS = flags.DEFINE_list("platforms", None, "Platforms to lower for: cpu, cuda, rocm, "
                               "tpu (default: this machine's); --format=jax only.")
_FORMAT = flags.DEFINE_enum("format", "jax", ["jax", "onnx"],
                            "jax: a jax.export artifact (any process with jax runs it); onnx: "
                            "an ONNX model for onnxruntime and other ONNX runtimes (needs "
                            "pip install --no-deps -r requirements-export.txt).")
flags.mark_flags_as_required(["workdir", "out"])


def sidecar_path(out: pathlib.Path) -> pathlib.Path:
  """Where the labels and the input contract go: OUT.json (model.jaxexport.json)."""
  return out.with_name(out.name + ".json")


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top
  import jax
  from sparse_rcnn_jax import sharding
  from sparse_rcnn_jax.evaluation import onnx_export
  from sparse_rcnn_jax.evaluation import serving

  cli.setup_logging()
  out = pathlib.Path(_OUT.value)
  onnx = _FORMAT.value == "onnx"
  if onnx and _PLATFORMS.value:
    raise app.UsageError("--platforms is for --format=jax; an ONNX model runs wherever its "
                         "runtime does.")
  platforms = tuple(_PLATFORMS.value or (jax.export.default_export_platform(),))
  build_model = (onnx_export.onnx_model if onnx else
                 lambda m, c: serving.serving_model(m, c, platforms))
  try:
    run = _RUN.load(sharding.make_mesh(jax.devices()[:1]), build_model=build_model)
    config, info, model, variables, step = (run.config, run.info, run.model, run.variables,
                                            run.step)
    multiple = model.backbone.size_divisibility
    height, width = serving.default_image_size(config.data, multiple)
    height = height if _HEIGHT.value is None else _HEIGHT.value
    width = width if _WIDTH.value is None else _WIDTH.value
    serving.check_input_shape(model, height, width, _BATCH.value)
  except (FileNotFoundError, ValueError, ImportError) as error:
    raise app.UsageError(str(error)) from error

  if onnx:
    try:
      blob = onnx_export.export_onnx(model, variables, height, width, _BATCH.value)
    except ImportError as error:
      raise app.UsageError(str(error)) from error
    record = onnx_export.contract(height, width, _BATCH.value, config.model, config.data,
                                  info, multiple)
    target = "onnxruntime"
  else:
    exported = serving.export_detector(model, variables, height, width, _BATCH.value,
                                       platforms)
    blob = serving.serialize(exported)
    record = serving.contract(exported, config.model, config.data, info, multiple)
    target = ",".join(exported.platforms)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(blob)
  record["checkpoint"] = {"workdir": str(pathlib.Path(_RUN.workdir.value).resolve()),
                          "step": step, "weights": "moving average" if run.ema else "trained"}
  sidecar_path(out).write_text(json.dumps(record, indent=1))
  images, image_whwh = (record["inputs"][k]["shape"] for k in ("images", "image_whwh"))
  shape = lambda dims: ",".join(str(d) for d in dims)
  print(f"Exported step {step} ({record['checkpoint']['weights']} weights, "
        f"{config.model.dtype}, {info.num_classes} classes) for {target}: "
        f"images uint8[{shape(images)}] + image_whwh float32[{shape(image_whwh)}] -> "
        f"{config.model.num_proposals} detections per image; {len(blob) / 2**20:.1f} MiB -> "
        f"{out} (labels and input contract: {sidecar_path(out)})")


if __name__ == "__main__":
  app.run(main)
