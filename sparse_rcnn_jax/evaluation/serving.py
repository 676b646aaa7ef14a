"""The whole inference of a trained detector as one exported program (`jax.export`, StableHLO).

The program maps what a server holds to detections, with no Python of ours around it:

  images      uint8 [B, H, W, 3] RGB 0..255, each image zero-padded bottom/right to H x W
  image_whwh  float32 [B, 4] (w, h, w, h) of each unpadded image
  ->
  scores      float32 [B, K] sigmoid class probability, descending
  labels      int32 [B, K] contiguous labels 0..C-1 (the dataset info's order)
  boxes       float32 [B, K, 4] absolute xyxy in input pixels, clipped to each unpadded image

K is the model's number of proposals: the official inference's top-k over every proposal and
class, no NMS, no score threshold (postprocess.py). A box empty after clipping (x2 <= x1 or
y2 <= y1) is kept in place; the official inference drops it. Another process runs the artifact
with jax alone (and the flatbuffers package, which jax.export's serialization needs), no import
of this package:

  exp = jax.export.deserialize(bytearray(open("model.jaxexport", "rb").read()))
  out = exp.call(images, image_whwh)

The weights are constants inside the program, not arguments: the artifact is self-contained
(nothing else to ship, load or match against it) and is called with exactly (images,
image_whwh), the signature its users asked for. The cost is its size: about that of the
parameters (float32, 4 bytes each, also for a bfloat16 model, which casts them where used).

The batch is symbolic by default: one artifact serves every batch size, compiled at the first
call of each. H and W are fixed, multiples of the backbone's `size_divisibility` (its
coarsest stride, 32 for every backbone here). The model chooses RoIAlign's form by platform when it is traced (roi_align "auto"),
and one artifact holds one traced program for all its platforms, so "auto" is resolved here
for the target platforms, which must agree on it.

The artifact carries no compiler options: the caller's XLA compiles it with its own defaults,
not with the options of our jitted programs (xla_cpu.py, on a CPU). Float32 detections agree
with predict.py's to float32 rounding either way; bfloat16 scores differ by bfloat16 rounding
(about 3e-4 on the tiny model) unless the caller sets the same XLA_FLAGS.
"""
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sparse_rcnn_jax.data import batching
from sparse_rcnn_jax.data import info as info_lib
from sparse_rcnn_jax.evaluation import postprocess
from sparse_rcnn_jax.model import detector
from sparse_rcnn_jax.model import roi_align
from sparse_rcnn_jax.model.head_config import HeadConfig

OUTPUTS = ("scores", "labels", "boxes")
BATCH_DIM = "b"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def default_image_size(data: ml_collections.ConfigDict,
                       size_divisibility: int) -> tuple[int, int]:
  """(H, W) evaluation pads a landscape image of the test size to: the smallest of
  `config.data.buckets` (or of batching's default rule: test_scale and max_size rounded up to
  multiples of the backbone's `size_divisibility`) that holds a test_scale x max_size image."""
  buckets = [tuple(int(v) for v in b) for b in data.buckets] or batching.default_buckets(
      data.test_scale, data.max_size, size_divisibility)
  return batching.select_bucket(data.test_scale, max(data.max_size, data.test_scale), buckets)


def check_input_shape(model: detector.SparseRCNN, height: int, width: int,
                      batch: int | None = None) -> None:
  """Raises ValueError, naming the fix, unless H and W are positive multiples of the stride
  and the batch (when fixed) is positive."""
  multiple = model.backbone.size_divisibility
  for name, size in (("height", height), ("width", width)):
    if size <= 0 or size % multiple:
      raise ValueError(
          f"Image {name} {size} is not a positive multiple of {multiple}, the stride of the "
          f"backbone's coarsest feature map: use {batching.round_up(max(size, 1), multiple)} "
          "and pad images bottom/right with zeros up to it.")
  if batch is not None and batch <= 0:
    raise ValueError(f"The batch size must be positive, got {batch}; none (no --batch) gives "
                     "a symbolic batch.")


def check_platforms(platforms: Sequence[str]) -> None:
  """Raises ValueError unless `platforms` are names jax.export lowers for (it takes any other
  name silently)."""
  unknown = [p for p in platforms if p not in PLATFORMS]
  if unknown:
    raise ValueError(f"Unknown platform(s) {unknown}: choose among "
                     f"{', '.join(PLATFORMS)} (a GPU is cuda or rocm).")


def roi_align_impl_for(impl: str, platforms: Sequence[str]) -> str:
  """RoIAlign's form in a program for `platforms`: an explicit one as is; "auto" as
  roi_align.py resolves it on each platform (separable on TPU, gather elsewhere), which must
  agree, since the program is traced once for all of them."""
  chosen = {p: roi_align.resolve_impl(impl, p) for p in platforms}
  if len(set(chosen.values())) > 1:
    raise ValueError(
        f"model.roi_align_impl 'auto' means {chosen} on the platforms {list(platforms)}, but "
        "one artifact holds one program: export once per group of platforms (e.g. "
        "--platforms=tpu, then --platforms=cpu,cuda), or choose one form for all, which "
        "computes the same function (--config WORKDIR/config.py "
        "--config.model.roi_align_impl=gather).")
  return next(iter(chosen.values()))


def conv_impl_for(platforms: Sequence[str]) -> str:
  """Convolutions in a program for `platforms`: an ordinary convolution's forward is XLA's
  whatever conv_impl says (conv_impl chooses its gradients, and an exported program is never
  differentiated), but a depthwise one's is not: XLA:CPU runs the grouped convolution 13-30x
  slower than the sum over taps of conv.py's CPU form, which GPUs and TPUs do not need. Every
  form computes the same function, so a program for CPUs and accelerators together takes
  XLA's."""
  return "matmul_grad" if set(platforms) == {"cpu"} else "xla"


def serving_model(model: ml_collections.ConfigDict, num_classes: int,
                  platforms: Sequence[str]) -> detector.SparseRCNN:
  """The detector of `config.model` with its platform choices made for `platforms`.

  RoIAlign's form is resolved by `roi_align_impl_for`, convolutions' by `conv_impl_for`.
  """
  check_platforms(platforms)
  head = HeadConfig.from_config(model, num_classes=num_classes)  # Names any field it lacks.
  impl = roi_align_impl_for(head.roi_align_impl, platforms)
  resolved = ml_collections.ConfigDict({**model.to_dict(), "conv_impl": conv_impl_for(platforms),
                                        "roi_align_impl": impl})
  return detector.build_model(resolved, num_classes)


def detect_fn(model: detector.SparseRCNN, variables: dict) -> Callable:
  """(images [B, H, W, 3], image_whwh [B, 4]) -> {"scores" [B, K], "labels" [B, K],
  "boxes" [B, K, 4]} (the module docstring) with `variables` closed over as constants."""
  def detect(images, image_whwh):
    out = model.apply(variables, images, image_whwh)
    # The unpadded input is the "original" image, (h, w): boxes stay in input pixels (scale 1)
    # and are clipped to each image.
    dets = postprocess.postprocess(out["pred_logits"][-1], out["pred_boxes"][-1], image_whwh,
                                   image_whwh[:, 1::-1])
    return {name: dets[name] for name in OUTPUTS}
  return detect


def input_specs(height: int, width: int, batch: int | None = None
                ) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
  """Shapes of (images, image_whwh); batch None: the symbolic dimension "b"."""
  b = jax.export.symbolic_shape(BATCH_DIM)[0] if batch is None else batch
  return (jax.ShapeDtypeStruct((b, height, width, 3), jnp.uint8),
          jax.ShapeDtypeStruct((b, 4), jnp.float32))


def export_detector(model: detector.SparseRCNN, variables: dict, height: int, width: int,
                    batch: int | None = None, platforms: Sequence[str] | None = None
                    ) -> jax.export.Exported:
  """The exported inference of `model` (from `serving_model`) with `variables` inside.

  Args:
    variables: {"params", "batch_stats"} as model_state.restore_variables returns them.
    height, width: H, W of the padded images, multiples of `model.backbone.size_divisibility`.
    batch: a fixed batch size, or None for a symbolic one.
    platforms: the platforms to lower for ("cpu", "cuda", "rocm", "tpu"); default: the
      current backend. `model` must have been built for them (serving_model).
  """
  check_input_shape(model, height, width, batch)
  # Host arrays: the constants carry no device or sharding of this process. A new closure per
  # call: jit's trace cache could otherwise hand back a program with other weights.
  variables = jax.tree.map(np.asarray, jax.device_get(variables))
  export = jax.export.export(jax.jit(detect_fn(model, variables)), platforms=platforms)
  try:
    return export(*input_specs(height, width, batch))
  except jax.errors.InconclusiveDimensionOperation as error:
    if batch is not None:
      raise
    raise ValueError(f"An operation of the model needs a known batch size ({error}); export "
                     "a fixed batch instead (--batch N).") from error


def serialize(exported: jax.export.Exported) -> bytes:
  """The artifact's bytes (jax.export's flatbuffer format)."""
  try:
    return bytes(exported.serialize())
  except ImportError as error:
    raise ImportError("Serializing an exported program needs the flatbuffers package: "
                      "pip install flatbuffers.") from error


def _shape(aval) -> list:
  """A shape with a symbolic dimension as its name: [b, H, W, 3]."""
  return [d if isinstance(d, int) else str(d) for d in aval.shape]


def io_contract(images_shape: Sequence[Any], model: ml_collections.ConfigDict,
                data: ml_collections.ConfigDict, info: info_lib.DatasetInfo,
                multiple: int) -> dict:
  """What a caller of an exported model (this module's or onnx_export's) needs to know, as
  JSON-ready data: the inputs (`images_shape` [B, H, W, 3], B an int or the symbol's name;
  `multiple`: size_divisibility), the outputs, the classes (`class_names[label]`,
  `category_ids[label]`) and the model dtype."""
  batch, height, width = images_shape[:3]
  k = model.num_proposals
  return {
      "batch": batch if isinstance(batch, int) else "symbolic",
      "height": height, "width": width,
      "inputs": {
          "images": {"shape": list(images_shape), "dtype": "uint8",
                     "pixel_format": "RGB, 0..255, channels last",
                     "padding": f"each image zero-padded bottom/right to {height} x {width}; "
                                f"height and width are multiples of {multiple}, the stride of "
                                "the backbone's coarsest feature map",
                     "resize": f"as the model was evaluated: short side {data.test_scale}, "
                               f"long side at most {data.max_size}"},
          "image_whwh": {"shape": [batch, 4], "dtype": "float32",
                         "meaning": "(w, h, w, h) of each unpadded image"}},
      "outputs": {
          "scores": {"shape": [batch, k], "dtype": "float32",
                     "meaning": "sigmoid class probability, descending"},
          "labels": {"shape": [batch, k], "dtype": "int32",
                     "meaning": "contiguous label: an index into class_names and category_ids"},
          "boxes": {"shape": [batch, k, 4], "dtype": "float32",
                    "meaning": "absolute xyxy in input pixels, clipped to each unpadded image"}},
      "num_detections": k,
      "class_names": list(info.class_names),
      "category_ids": list(info.category_ids),
      "model_dtype": model.dtype,
  }


def contract(exported: jax.export.Exported, model: ml_collections.ConfigDict,
             data: ml_collections.ConfigDict, info: info_lib.DatasetInfo,
             multiple: int) -> dict:
  """`io_contract` of the artifact, with how to call it and what it was lowered for."""
  images, _ = exported.in_avals
  return {"call": "jax.export.deserialize(bytearray(blob)).call(images, image_whwh)",
          **io_contract(_shape(images), model, data, info, multiple),
          "platforms": list(exported.platforms),
          "jax_version": jax.__version__,
          "calling_convention_version": exported.calling_convention_version}
