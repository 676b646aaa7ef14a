"""Backbones by name: `config.model.backbone.name` picks one from `BACKBONES`.

A backbone is a linen module (one module in this folder) with

    from_config(backbone: ConfigDict, *, dtype: str, conv_impl: str)  # classmethod
    levels -> tuple[int, ...]           # known before tracing
    is_frozen(path: tuple[str, ...]) -> bool
    __call__(images: [B, H, W, 3] normalized RGB) -> {level: [B, H / 2**level, W / 2**level, C_l]}

`from_config` builds it from `config.model.backbone` (its own fields beside `name`), the model's
compute dtype (precision.py) and `model.conv_impl` (conv.make_conv). `levels` are the pyramid
levels it returns, consecutive, fine to coarse; level l has stride 2**l, and the FPN and RoIAlign
work on exactly these levels. `is_frozen` says whether the parameter at a path inside its own
params is frozen under its config; the optimizer masks those. Adding a backbone is that module
and one entry in `BACKBONES`; `--config.model.backbone.name=NAME` selects it.
"""
from typing import Protocol

import jax
import ml_collections

from sparse_rcnn_jax.backbones.resnet import ResNet


class Backbone(Protocol):
  """What the detector, the FPN and the optimizer use of a backbone (see the module docstring)."""
  levels: tuple[int, ...]

  def is_frozen(self, path: tuple[str, ...]) -> bool: ...

  def __call__(self, images: jax.Array) -> dict[int, jax.Array]: ...


BACKBONES = {
    "resnet": ResNet,
}


def build_backbone(backbone: ml_collections.ConfigDict, *, dtype: str,
                   conv_impl: str) -> Backbone:
  """The backbone named by `config.model.backbone.name`, built from `config.model.backbone`."""
  if backbone.name not in BACKBONES:
    raise ValueError(f"Unknown config.model.backbone.name {backbone.name!r}; choose one of "
                     f"{sorted(BACKBONES)}.")
  return BACKBONES[backbone.name].from_config(backbone, dtype=dtype, conv_impl=conv_impl)
