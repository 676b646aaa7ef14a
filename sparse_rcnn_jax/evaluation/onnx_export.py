"""The whole inference as one ONNX model (`export.py --format onnx`), for runtimes without JAX.

The same program and contract as serving.py's `jax.export` artifact, as ONNX (opset 23):

  images      uint8 [B, H, W, 3] RGB 0..255, each image zero-padded bottom/right to H x W
  image_whwh  float32 [B, 4] (w, h, w, h) of each unpadded image
  ->
  scores      float32 [B, K] sigmoid class probability, descending
  labels      int32 [B, K] contiguous labels 0..C-1 (the dataset info's order)
  boxes       float32 [B, K, 4] absolute xyxy in input pixels, clipped to each unpadded image

B is symbolic ("B") unless a batch is fixed; H and W are fixed. Pixel normalization, the
backbone, the FPN, every head stage and the top-k post-processing are all inside, with the
weights as initializers. onnxruntime runs it with no JAX and no import of this package:

  session = onnxruntime.InferenceSession("model.onnx")
  scores, labels, boxes = session.run(["scores", "labels", "boxes"],
                                      {"images": images, "image_whwh": image_whwh})

How. jax2onnx (requirements-export.txt) converts the program. While it traces, it replaces
flax's and jax.numpy's functions with its own, some of which take fewer arguments than the
originals (flax's max_pool, jnp.stack), so the program is first traced to a jaxpr by JAX
alone, and the converter traces a replay of that jaxpr, which binds only lax primitives. The
symbolic batch of both traces is one symbol. Two of our operations are stated in forms whose
conversion runs: ResNet's stem max-pool (resnet.max_pool_3x3_s2: ONNX runtimes pool over at
most three dimensions) and the top-k's label arithmetic (postprocess.top_k); both compute what
they did, as their tests check.

Forms. Convolutions are ONNX Conv (grouped for depthwise ones: conv_impl "xla"); RoIAlign is
the gather form unless the config names another. Only float32 models convert: a bfloat16
model has the same float32 parameters, so export it with --config.model.dtype=float32.
"""
import contextlib
import logging
from typing import Any

import jax
from jax.extend import core as jax_core
import ml_collections
import numpy as np

from sparse_rcnn_jax.data import info as info_lib
from sparse_rcnn_jax.evaluation import serving
from sparse_rcnn_jax.model import detector
from sparse_rcnn_jax.model import roi_align
from sparse_rcnn_jax.model.head_config import HeadConfig

INPUTS = ("images", "image_whwh")
BATCH_DIM = "B"
OPSET = 23
INSTALL = "pip install --no-deps -r requirements-export.txt"


def _converter():
  """jax2onnx's to_onnx, or an ImportError naming the install command."""
  try:
    from jax2onnx import to_onnx  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(f"ONNX export needs jax2onnx and onnx: {INSTALL} (its pins are ours; "
                      f"--no-deps because jax2onnx declares an older orbax-checkpoint, which "
                      f"the conversion does not use). ({error})") from error
  return to_onnx


@contextlib.contextmanager
def _quiet_converter_logs():
  """Errors only from the converter's loggers meanwhile: jax2onnx imports every plugin it
  ships at its first conversion and logs a warning with a traceback for each whose library
  (equinox, dm_pix) is absent, though none converts our programs, and onnx_ir warns about each
  intermediate shape value it does not serialize."""
  loggers = [logging.getLogger(name) for name in ("jax2onnx", "onnx_ir")]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def onnx_model(model: ml_collections.ConfigDict, num_classes: int) -> detector.SparseRCNN:
  """The detector of `config.model` in the forms the ONNX model holds (module docstring).

  Raises:
    ValueError: a bfloat16 model (say how to export its float32 form) or a config lacking a
      head field.
  """
  if model.dtype != "float32":
    raise ValueError(f"ONNX export converts float32 models; this one computes in "
                     f"{model.dtype}. Its parameters are float32: export it as float32 with "
                     "--config WORKDIR/config.py --config.model.dtype=float32.")
  head = HeadConfig.from_config(model, num_classes=num_classes)  # Names any field it lacks.
  resolved = ml_collections.ConfigDict({
      **model.to_dict(), "conv_impl": "xla",
      "roi_align_impl": roi_align.resolve_impl(head.roi_align_impl, "cpu")})
  return detector.build_model(resolved, num_classes)


def export_onnx(model: detector.SparseRCNN, variables: dict, height: int, width: int,
                batch: int | None = None) -> bytes:
  """The serialized ONNX model of `model` (from `onnx_model`) with `variables` inside.

  Args:
    variables: {"params", "batch_stats"} as model_state.restore_variables returns them.
    height, width: H, W of the padded images, multiples of `model.backbone.size_divisibility`.
    batch: a fixed batch size, or None for the symbolic "B".
  Raises:
    ImportError: jax2onnx is not installed (names the command).
    ValueError: a bad input shape.
  """
  to_onnx = _converter()
  serving.check_input_shape(model, height, width, batch)
  variables = jax.tree.map(np.asarray, jax.device_get(variables))
  detect = serving.detect_fn(model, variables)

  def detections(images, image_whwh):
    out = detect(images, image_whwh)
    return tuple(out[name] for name in serving.OUTPUTS)

  b = jax.export.symbolic_shape(BATCH_DIM)[0] if batch is None else batch
  specs = (jax.ShapeDtypeStruct((b, height, width, 3), np.uint8),
           jax.ShapeDtypeStruct((b, 4), np.float32))
  replay = jax_core.jaxpr_as_fun(jax.make_jaxpr(detections)(*specs))
  with _quiet_converter_logs():
    proto = to_onnx(replay, specs, model_name="sparse_rcnn", opset=OPSET,
                    input_names=list(INPUTS), output_names=list(serving.OUTPUTS))
  return proto.SerializeToString()


def contract(height: int, width: int, batch: int | None, model: ml_collections.ConfigDict,
             data: ml_collections.ConfigDict, info: info_lib.DatasetInfo,
             multiple: int) -> dict:
  """serving.io_contract of the ONNX model, with how to call it."""
  return {"call": 'onnxruntime.InferenceSession(path).run(["scores", "labels", "boxes"], '
                  '{"images": images, "image_whwh": image_whwh})',
          **serving.io_contract([BATCH_DIM if batch is None else batch, height, width, 3],
                                model, data, info, multiple),
          "format": f"ONNX, opset {OPSET}"}
