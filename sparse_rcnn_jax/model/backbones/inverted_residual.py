"""Inverted-residual networks (MobileNetV2, EfficientNet-Lite), NHWC, built from a spec.

A block (Sandler et al. 2018, MobileNetV2): a 1x1 expansion conv + norm + ReLU6 (absent when
the expansion ratio is 1), a k x k depthwise conv of stride s + norm + ReLU6, and a linear 1x1
projection + norm; the block's input is added when s = 1 and the channels stay. The network is
a 3x3 stride-2 stem conv + norm + ReLU6, then the blocks. A spec (`NetSpec`, data) describes
one network; the modules, the name tables of mobilenet_v2.py and efficientnet_lite.py, and the
ImageNet classifier that checks pretrained weights all read it.

Parts by pyramid level, as the ResNet's: "stem" is the stem conv and the blocks at stride 2,
"stage2".."stage5" the blocks whose output is at stride 4..32. Levels 2..5 are the outputs of
stage2..stage5, i.e. of the last block at each stride: the deepest features of that
resolution, the outputs a detector's FPN reads (EfficientDet reads the same ones). The
classifier's 1x1 conv to 1280 channels that follows the last block is not part of the backbone:
it was trained to feed global pooling, and at stride 32 it would quadruple level 5's width.
"""
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sparse_rcnn_jax.convert.name_table import Entry
from sparse_rcnn_jax.model import conv
from sparse_rcnn_jax.model import precision
from sparse_rcnn_jax.model.backbones import layers

PARTS = ("stem", "stage2", "stage3", "stage4", "stage5")
PADDINGS = ("same", "symmetric")


class BlockSpec(NamedTuple):
  """One inverted-residual block."""
  in_channels: int
  out_channels: int
  expand_ratio: int
  kernel_size: int
  stride: int

  @property
  def hidden_channels(self) -> int:
    return self.in_channels * self.expand_ratio

  @property
  def residual(self) -> bool:
    return self.stride == 1 and self.in_channels == self.out_channels


class NetSpec(NamedTuple):
  """A whole network.

  Attributes:
    stem_channels: output channels of the 3x3 stride-2 stem conv.
    parts: the blocks of each part of PARTS, in order (`group_by_part`).
    head_channels: the ImageNet classifier's 1x1 conv width (not part of the backbone).
    padding: "same" (TensorFlow's: the output has ceil(size / stride) pixels, the padding's
      odd pixel goes bottom/right) or "symmetric" (PyTorch's (k - 1) // 2 on every side).
    eps: the batch norms' epsilon that the weights were trained with.
  """
  stem_channels: int
  parts: dict[str, tuple[BlockSpec, ...]]
  head_channels: int
  padding: str
  eps: float


def group_by_part(blocks: list[BlockSpec]) -> dict[str, tuple[BlockSpec, ...]]:
  """Blocks in network order -> {part: blocks}, by the stride of each block's output (the stem
  conv has stride 2): stride 2 -> "stem", 4 -> "stage2", ..., 32 -> "stage5"."""
  parts = {part: [] for part in PARTS}
  stride = 2
  for block in blocks:
    stride *= block.stride
    parts[PARTS[max(stride.bit_length() - 2, 0)]].append(block)
  return {part: tuple(blocks) for part, blocks in parts.items()}


def relu6(x: jax.Array) -> jax.Array:
  return jnp.clip(x, 0, 6)


class ConvNorm(nn.Module):
  """A bias-free conv (ordinary or depthwise) + norm, then ReLU6 unless `linear`.

  The kernel [k, k, I, O] (depthwise: [k, k, 1, C]) is stored float32 and applied in `dtype`;
  init kaiming normal, fan_out, as torchvision's MobileNetV2.
  """
  out_channels: int
  kernel_size: int = 1
  stride: int = 1
  depthwise: bool = False
  linear: bool = False
  padding: str = "symmetric"
  norm: str = "frozen_bn"
  eps: float = 1e-5
  conv_impl: str = "auto"
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, I] -> [B, H', W', out_channels] in `dtype`."""
    k, s = self.kernel_size, self.stride
    in_channels = 1 if self.depthwise else x.shape[-1]
    kernel = self.param("kernel", nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                        (k, k, in_channels, self.out_channels))
    if self.padding not in PADDINGS:
      raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}.")
    pads = conv.same_padding(x.shape[1:3], k, s) if self.padding == "same" else None
    make = conv.make_depthwise_conv if self.depthwise else conv.make_conv
    dtype = precision.compute_dtype(self.dtype)
    y = make(self.conv_impl)(x.astype(dtype), kernel.astype(dtype), s, pads)
    y = layers.make_norm(self.norm, self.out_channels, self.dtype, self.eps)(y)
    return y if self.linear else relu6(y)


class InvertedResidual(nn.Module):
  """One block (module docstring): submodules "expand" (if any), "depthwise", "project"."""
  spec: BlockSpec
  padding: str
  norm: str
  eps: float
  conv_impl: str = "auto"
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, in_channels] -> [B, H / stride, W / stride, out_channels] (rounded up)."""
    s = self.spec
    layer = dict(padding=self.padding, norm=self.norm, eps=self.eps, conv_impl=self.conv_impl,
                 dtype=self.dtype)
    y = x
    if s.expand_ratio != 1:
      y = ConvNorm(s.hidden_channels, name="expand", **layer)(y)
    y = ConvNorm(s.hidden_channels, s.kernel_size, s.stride, depthwise=True, name="depthwise",
                 **layer)(y)
    y = ConvNorm(s.out_channels, linear=True, name="project", **layer)(y)
    return x + y if s.residual else y


class InvertedResidualNet(nn.Module):
  """The backbone of a `NetSpec` (subclasses give `spec`, pixel statistics and weights).

  Attributes:
    norm: "frozen_bn" (pretrained weights; values in "batch_stats") or "group_norm" (trainable;
      for training from scratch).
    freeze_at: 0 freezes nothing, k >= 1 the first k parts of PARTS ("stem", then the stages of
      levels 2..k), as the ResNet's freeze_at. Frozen parts get no gradient (stop_gradient on
      their output), and `is_frozen` names their parameters for the optimizer's mask.
    conv_impl: how convolutions are computed and differentiated (conv.py).
    dtype: the compute dtype (precision.py); parameters and statistics stay float32.
  """
  norm: str = "frozen_bn"
  freeze_at: int = 2
  conv_impl: str = "auto"
  dtype: str = "float32"

  pixel_mean: ClassVar[tuple[float, float, float]]
  pixel_std: ClassVar[tuple[float, float, float]]

  @property
  def spec(self) -> NetSpec:
    raise NotImplementedError

  @property
  def levels(self) -> tuple[int, ...]:
    """The pyramid levels returned: stage2..stage5 are levels 2..5 (strides 4..32)."""
    return (2, 3, 4, 5)

  @property
  def size_divisibility(self) -> int:
    """Images are padded to multiples of the coarsest stride, so every level halves exactly
    (with "same" padding any size works; this keeps the FPN's sizes exact)."""
    return 2**self.levels[-1]

  def is_frozen(self, path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` (e.g. ("stage2", "block0", "expand", "kernel")) lies in
    one of the first `freeze_at` parts."""
    return path[0] in PARTS[:self.freeze_at]

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[int, jax.Array]:
    """x: [B, H, W, 3] normalized RGB, NHWC.

    Returns:
      {2: [B, H2, W2, C2], 3, 4, 5}: the outputs of stage2..stage5 at strides 4..32, in
      `dtype`.
    """
    if not 0 <= self.freeze_at <= len(PARTS):
      raise ValueError(f"freeze_at must be in 0..{len(PARTS)}, got {self.freeze_at}.")
    spec = self.spec
    layer = dict(padding=spec.padding, norm=self.norm, eps=spec.eps, conv_impl=self.conv_impl,
                 dtype=self.dtype)
    features = {}
    for level, part in enumerate(PARTS, start=1):
      x = _Part(spec.parts[part], stem_channels=spec.stem_channels if part == "stem" else 0,
                name=part, **layer)(x)
      if self.is_frozen((part,)):
        x = jax.lax.stop_gradient(x)
      if level >= 2:
        features[level] = x
    return features

  @classmethod
  def from_config(cls, backbone: ml_collections.ConfigDict, *, dtype: str,
                  conv_impl: str) -> "InvertedResidualNet":
    """The network of `config.model.backbone` (fields norm, freeze_at)."""
    return cls(norm=backbone.norm, freeze_at=backbone.freeze_at, conv_impl=conv_impl,
               dtype=dtype)

  def load_weights(self, weights: str) -> dict:
    """{"params", "batch_stats", "classifier"} (NumPy; the classifier's own {"params",
    "batch_stats"}) of `weights`: "imagenet" or a path."""
    raise NotImplementedError

  def pretrained(self, weights: str) -> dict:
    """{"params", "batch_stats"} (NumPy) of the backbone in `weights` (see load_weights)."""
    if self.norm != "frozen_bn":
      raise ValueError(f"Pretrained weights hold batch norms: set model.backbone.norm to "
                       f"'frozen_bn', not {self.norm!r}.")
    variables = self.load_weights(weights)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


class _Part(nn.Module):
  """The blocks of one part, named block0, block1, ...; the "stem" part starts with the stem
  conv, named "conv"."""
  blocks: tuple[BlockSpec, ...]
  stem_channels: int
  padding: str
  norm: str
  eps: float
  conv_impl: str = "auto"
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    layer = dict(padding=self.padding, norm=self.norm, eps=self.eps, conv_impl=self.conv_impl,
                 dtype=self.dtype)
    if self.stem_channels:
      x = ConvNorm(self.stem_channels, 3, 2, name="conv", **layer)(x)
    for j, block in enumerate(self.blocks):
      x = InvertedResidual(block, name=f"block{j}", **layer)(x)
    return x


class Classifier(nn.Module):
  """The ImageNet classifier on top of level 5, for checking pretrained weights: a 1x1 conv to
  `spec.head_channels` + norm + ReLU6, global average pooling, a linear layer (with bias)."""
  spec: NetSpec
  num_classes: int = 1000

  @nn.compact
  def __call__(self, level5: jax.Array) -> jax.Array:
    """level5: [B, h, w, C5] -> logits [B, num_classes] (float32)."""
    y = ConvNorm(self.spec.head_channels, padding=self.spec.padding, eps=self.spec.eps,
                 name="conv")(level5.astype(jnp.float32))
    return nn.Dense(self.num_classes, name="fc")(y.mean(axis=(1, 2)))


def classifier_entries(spec: NetSpec, conv: str, norm: str, fc: str,
                       num_classes: int = 1000) -> dict[str, Entry]:
  """Name-table entries of `Classifier` (under "classifier"): the file's 1x1 conv `conv`
  (its weight's name) with batch norm `norm`, and its linear layer `fc` (the prefix of
  `fc`.weight [num_classes, head_channels] and `fc`.bias)."""
  last = spec.parts["stage5"][-1].out_channels
  head = layers.conv_norm_entries(conv, norm, ("conv",), (spec.head_channels, last, 1, 1))
  head[f"{fc}.weight"] = Entry(("params", "fc", "kernel"), (num_classes, spec.head_channels))
  head[f"{fc}.bias"] = Entry(("params", "fc", "bias"), (num_classes,))
  return {name: Entry(entry.path and ("classifier",) + entry.path, entry.shape)
          for name, entry in head.items()}
