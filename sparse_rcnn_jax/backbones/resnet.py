"""ResNet backbone with torchvision / detectron2 semantics, NHWC; registered as "resnet".

Layers, paddings and strides follow torchvision's ImageNet ResNets (stride on the 3x3 conv of a
bottleneck), so converted torchvision or detectron2 weights give the network they were trained
for, and output sizes equal PyTorch's for any input size. Submodule names mirror detectron2
(`stem/conv1`, `res2/block0/conv1/norm`, `res3/block0/shortcut`) so that the weight converter in
`convert/backbone.py` is a plain name map.

The architecture is described once, as data (`resnet_spec`), and both the modules and the
converter read it.
"""
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sparse_rcnn_jax import conv
from sparse_rcnn_jax import precision

# Residual blocks per stage res2..res5.
STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STAGES = ("res2", "res3", "res4", "res5")
# The parts `freeze_at` freezes, in order: freeze_at = k freezes the first k.
FREEZABLE = ("stem",) + STAGES
NORMS = ("frozen_bn", "group_norm")
# Names of the frozen batch norm's values in the "batch_stats" collection (PyTorch's names).
BATCH_NORM_STATS = ("weight", "bias", "running_mean", "running_var")


class ConvSpec(NamedTuple):
  """One bias-free conv followed by a norm; padding is (kernel_size - 1) // 2 on every side."""
  name: str
  in_channels: int
  out_channels: int
  kernel_size: int
  stride: int


class BlockSpec(NamedTuple):
  """One residual block: the convs of the residual branch in order (ReLU between them) and the
  projection shortcut, or None for the identity."""
  convs: tuple[ConvSpec, ...]
  shortcut: ConvSpec | None


class ResNetSpec(NamedTuple):
  """The stem conv and the blocks of each stage "res2".."res5"."""
  stem: ConvSpec
  stages: dict[str, tuple[BlockSpec, ...]]


def resnet_spec(depth: int, width: int = 64) -> ResNetSpec:
  """The layers of a ResNet: depth 18/34 use basic blocks, 50/101 bottlenecks.

  `width` is the stem's channel count; the inner widths of res2..res5 are width * (1, 2, 4, 8)
  and a bottleneck's output is 4x its inner width. The first block of res3..res5 has stride 2.
  """
  if depth not in STAGE_BLOCKS:
    raise ValueError(f"ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {depth}.")
  bottleneck = depth >= 50
  in_channels = width
  stages = {}
  for index, (stage, num_blocks) in enumerate(zip(STAGES, STAGE_BLOCKS[depth])):
    inner = width * 2**index
    out = inner * 4 if bottleneck else inner
    blocks = []
    for j in range(num_blocks):
      stride = 2 if index > 0 and j == 0 else 1
      if bottleneck:
        convs = (ConvSpec("conv1", in_channels, inner, 1, 1),
                 ConvSpec("conv2", inner, inner, 3, stride),
                 ConvSpec("conv3", inner, out, 1, 1))
      else:
        convs = (ConvSpec("conv1", in_channels, out, 3, stride),
                 ConvSpec("conv2", out, out, 3, 1))
      shortcut = None
      if in_channels != out or stride != 1:
        shortcut = ConvSpec("shortcut", in_channels, out, 1, stride)
      blocks.append(BlockSpec(convs, shortcut))
      in_channels = out
    stages[stage] = tuple(blocks)
  return ResNetSpec(ConvSpec("conv1", 3, width, 7, 2), stages)


class FrozenBatchNorm(nn.Module):
  """Batch norm with fixed statistics and affine: y = x * scale + shift over the last axis.

  All four values live in the "batch_stats" collection, not in "params", so they are never
  trained; they start as the identity (weight 1, bias 0, mean 0, var 1). They stay float32 and
  the affine is applied in float32; the output has the input's dtype.
  """
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., C] -> [..., C]."""
    channels = x.shape[-1]
    init = {"weight": jnp.ones, "bias": jnp.zeros, "running_mean": jnp.zeros,
            "running_var": jnp.ones}
    stats = {name: self.variable("batch_stats", name, init[name], (channels,), jnp.float32).value
             for name in BATCH_NORM_STATS}
    scale = stats["weight"] * jax.lax.rsqrt(stats["running_var"] + self.eps)
    shift = stats["bias"] - stats["running_mean"] * scale
    return (x.astype(jnp.float32) * scale + shift).astype(x.dtype)


def make_norm(kind: str, channels: int, dtype: str = "float32") -> nn.Module:
  """The norm after each conv, named "norm" like detectron2's `conv.norm`.

  group_norm (trainable, for training from scratch) uses 32 groups, or the largest divisor of
  32 that divides `channels` when there are fewer channels (tiny test networks); its output is
  in `dtype` (statistics in float32).
  """
  if kind == "frozen_bn":
    return FrozenBatchNorm(name="norm")
  if kind == "group_norm":
    return nn.GroupNorm(num_groups=math.gcd(32, channels), epsilon=1e-5,
                        dtype=precision.compute_dtype(dtype), name="norm")
  raise ValueError(f"norm must be one of {NORMS}, got {kind!r}.")


class ConvNorm(nn.Module):
  """detectron2's Conv2d with a norm: bias-free conv (PyTorch padding), then norm.

  The kernel [kH, kW, I, O] sits directly under this module, next to the "norm" submodule,
  mirroring detectron2's `conv1.weight` and `conv1.norm.*`. Init: kaiming normal, fan_out, like
  torchvision and detectron2's c2_msra_fill. The kernel is stored float32 and the convolution
  computed in `dtype`.
  """
  spec: ConvSpec
  norm: str
  conv_impl: str = "auto"
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, I] -> [B, H', W', O] with H' = (H + 2p - k) // stride + 1 as in PyTorch."""
    s = self.spec
    kernel = self.param("kernel", nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                        (s.kernel_size, s.kernel_size, s.in_channels, s.out_channels))
    dtype = precision.compute_dtype(self.dtype)
    y = conv.make_conv(self.conv_impl)(x.astype(dtype), kernel.astype(dtype), s.stride)
    return make_norm(self.norm, s.out_channels, self.dtype)(y)


class ResidualBlock(nn.Module):
  """Basic block or bottleneck, per `spec`: relu(branch(x) + shortcut(x))."""
  spec: BlockSpec
  norm: str
  conv_impl: str = "auto"
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, I] -> [B, H / stride, W / stride, O] (PyTorch rounding)."""
    y = x
    for index, conv in enumerate(self.spec.convs):
      y = ConvNorm(conv, self.norm, self.conv_impl, self.dtype, name=conv.name)(y)
      if index < len(self.spec.convs) - 1:
        y = nn.relu(y)
    shortcut = self.spec.shortcut
    if shortcut is not None:
      x = ConvNorm(shortcut, self.norm, self.conv_impl, self.dtype, name=shortcut.name)(x)
    return nn.relu(y + x)


class Stage(nn.Module):
  """A sequence of residual blocks named block0, block1, ..."""
  blocks: tuple[BlockSpec, ...]
  norm: str
  conv_impl: str = "auto"
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j, block in enumerate(self.blocks):
      x = ResidualBlock(block, self.norm, self.conv_impl, self.dtype, name=f"block{j}")(x)
    return x


class Stem(nn.Module):
  """7x7/2 conv + norm + ReLU, then 3x3/2 max-pool with padding 1 (padded with -inf, as torch)."""
  spec: ConvSpec
  norm: str
  conv_impl: str = "auto"
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, 3] -> [B, ~H/4, ~W/4, width]."""
    x = nn.relu(ConvNorm(self.spec, self.norm, self.conv_impl, self.dtype,
                           name=self.spec.name)(x))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ResNet(nn.Module):
  """ResNet-18/34/50/101 feature extractor returning res2..res5 as pyramid levels 2..5.

  Attributes:
    depth: 18 or 34 (basic blocks), 50 or 101 (bottlenecks).
    width: stem channels; 64 for the standard networks, smaller for tiny test networks.
    norm: "frozen_bn" (pretrained weights; values in "batch_stats") or "group_norm" (trainable,
      no "batch_stats"; for training from scratch).
    freeze_at: 0 freezes nothing, 1 the stem, k >= 2 the stem and res2..res{k}. Frozen parts get
      no gradient (stop_gradient on their output), and `is_frozen` names their parameters for
      the optimizer's mask.
    conv_impl: how convolutions are differentiated (conv.make_conv).
    dtype: the compute dtype (precision.py); parameters and statistics stay float32.
  """
  depth: int
  width: int = 64
  norm: str = "frozen_bn"
  freeze_at: int = 2
  conv_impl: str = "auto"
  dtype: str = "float32"

  @classmethod
  def from_config(cls, backbone: ml_collections.ConfigDict, *, dtype: str,
                  conv_impl: str) -> "ResNet":
    """The ResNet of `config.model.backbone` (fields depth, width, norm, freeze_at)."""
    return cls(depth=backbone.depth, width=backbone.width, norm=backbone.norm,
               freeze_at=backbone.freeze_at, conv_impl=conv_impl, dtype=dtype)

  @property
  def levels(self) -> tuple[int, ...]:
    """The pyramid levels returned: res2..res5 are levels 2..5 (strides 4..32)."""
    return tuple(range(2, 2 + len(STAGES)))

  def is_frozen(self, path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` (inside this module's params, e.g. ("stem", "conv1",
    "kernel")) is frozen: it lies in one of the first `freeze_at` parts of FREEZABLE."""
    return path[0] in FREEZABLE[:self.freeze_at]

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[int, jax.Array]:
    """x: [B, H, W, 3] normalized RGB, NHWC.

    Returns:
      {2: [B, H2, W2, C2], 3, 4, 5}: res2..res5 by level, at strides 4, 8, 16, 32 (sizes
      rounded as PyTorch does), C = width * (1, 2, 4, 8), times 4 for bottlenecks; in `dtype`.
    """
    if not 0 <= self.freeze_at <= len(FREEZABLE):
      raise ValueError(f"freeze_at must be in 0..{len(FREEZABLE)}, got {self.freeze_at}.")
    spec = resnet_spec(self.depth, self.width)
    x = Stem(spec.stem, self.norm, self.conv_impl, self.dtype, name="stem")(x)
    if self.is_frozen(("stem",)):
      x = jax.lax.stop_gradient(x)
    features = {}
    for level, (stage, blocks) in zip(self.levels, spec.stages.items()):
      x = Stage(blocks, self.norm, self.conv_impl, self.dtype, name=stage)(x)
      if self.is_frozen((stage,)):
        x = jax.lax.stop_gradient(x)
      features[level] = x
    return features
