"""ResNet backbone with torchvision / detectron2 semantics, NHWC; registered as "resnet".

Layers, paddings and strides follow torchvision's ImageNet ResNets (stride on the 3x3 conv of a
bottleneck), so converted torchvision or detectron2 weights give the network they were trained
for, and output sizes equal PyTorch's for any input size. Submodule names mirror detectron2
(`stem/conv1`, `res2/block0/conv1/norm`, `res3/block0/shortcut`) so that the weight names are a
plain table (`detectron2_table`; torchvision's names are renamed to detectron2's first).

The architecture is described once, as data (`resnet_spec`), and both the modules and the
name table read it. Pixels are normalized with torchvision's ImageNet statistics (those of the
official Sparse R-CNN config). No pip package holds ResNet ImageNet weights:
`model.backbone.weights` takes the path of torchvision's file (e.g. resnet50-0676ba61.pth).
"""
from collections.abc import Mapping
import re
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sparse_rcnn_jax.convert import name_table
from sparse_rcnn_jax.convert.name_table import Entry
from sparse_rcnn_jax.model import conv
from sparse_rcnn_jax.model import precision
from sparse_rcnn_jax.model.backbones import layers
from sparse_rcnn_jax.model.backbones import weights as weights_lib

# Residual blocks per stage res2..res5.
STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STAGES = ("res2", "res3", "res4", "res5")
# The parts `freeze_at` freezes, in order: freeze_at = k freezes the first k.
FREEZABLE = ("stem",) + STAGES


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


def _conv_entries(name: str, path: tuple[str, ...], spec: ConvSpec) -> dict[str, Entry]:
  """detectron2's `name.weight` and `name.norm.*` of one conv with frozen batch norm."""
  k = spec.kernel_size
  entries = layers.conv_norm_entries(f"{name}.weight", f"{name}.norm", path,
                                     (spec.out_channels, spec.in_channels, k, k))
  del entries[f"{name}.norm.num_batches_tracked"]  # detectron2's frozen norms keep no counter
  return entries


def detectron2_table(depth: int, width: int) -> dict[str, Entry]:
  """Every detectron2 ResNet name (e.g. `res3.0.shortcut.norm.bias`) with its flax place."""
  spec = resnet_spec(depth, width)
  table = _conv_entries(f"stem.{spec.stem.name}", ("stem", spec.stem.name), spec.stem)
  for stage, blocks in spec.stages.items():
    for j, block in enumerate(blocks):
      for conv_spec in block.convs + ((block.shortcut,) if block.shortcut else ()):
        table.update(_conv_entries(f"{stage}.{j}.{conv_spec.name}",
                                   (stage, f"block{j}", conv_spec.name), conv_spec))
  return table


def _stem_width(weight: Any, out_axis: int, where: str) -> int:
  """The ResNet width (stem channels), read from the stem conv weight."""
  if np.ndim(weight) != 4:
    raise ValueError(f"Cannot tell the ResNet width: {where} is missing or not a 4-D conv weight.")
  return np.shape(weight)[out_axis]


def resnet_from_detectron2(state: Mapping[str, np.ndarray], depth: int) -> tuple[dict, dict]:
  """detectron2 ResNet state dict (names without "backbone.bottom_up.") -> (params, batch_stats).

  The width is read from `stem.conv1.weight`. The result fits `ResNet(depth, width,
  norm="frozen_bn")`: `apply({"params": params, "batch_stats": batch_stats}, images)`.
  """
  width = _stem_width(state.get("stem.conv1.weight"), 0,
                      "'stem.conv1.weight' (for torchvision names use resnet_from_torchvision)")
  trees = name_table.from_torch(state, detectron2_table(depth, width),
                                f"detectron2 ResNet-{depth} (width {width}) state dict")
  return trees["params"], trees["batch_stats"]


def resnet_to_detectron2(params: Mapping[str, Any], batch_stats: Mapping[str, Any],
                         depth: int) -> dict[str, np.ndarray]:
  """Inverse of `resnet_from_detectron2`: detectron2 names, PyTorch layouts, NumPy arrays."""
  kernel = params.get("stem", {}).get("conv1", {}).get("kernel")
  width = _stem_width(kernel, -1, "params['stem']['conv1']['kernel']")
  return name_table.to_torch_state({"params": params, "batch_stats": batch_stats},
                                   detectron2_table(depth, width),
                                   f"ResNet-{depth} (width {width}) variables")


_STATS = "|".join(layers.BATCH_NORM_STATS)
# torchvision names inside a block (or the stem) -> detectron2's.
_TORCHVISION_RENAMES = (
    (r"conv(\d)\.weight", r"conv\1.weight"),
    (rf"bn(\d)\.({_STATS})", r"conv\1.norm.\2"),
    (r"downsample\.0\.weight", "shortcut.weight"),
    (rf"downsample\.1\.({_STATS})", r"shortcut.norm.\1"),
)


def _detectron2_name(torchvision_name: str) -> str | None:
  """`layer1.0.bn2.bias` -> `res2.0.conv2.norm.bias`, `conv1.weight` -> `stem.conv1.weight`;
  None for a name that is not a torchvision ResNet's."""
  prefix, rest = "stem", torchvision_name
  if block := re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", torchvision_name):
    prefix, rest = f"res{int(block[1]) + 1}.{block[2]}", block[3]
  for pattern, replacement in _TORCHVISION_RENAMES:
    if match := re.fullmatch(pattern, rest):
      return f"{prefix}.{match.expand(replacement)}"
  return None


def torchvision_to_detectron2(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames a torchvision ImageNet ResNet state dict to detectron2's backbone names.

  conv1/bn1 -> stem.conv1(.norm), layerN -> res{N+1}, bnK -> convK.norm, downsample.0/1 ->
  shortcut(.norm). The classifier (fc.*) and num_batches_tracked are dropped; arrays are
  passed through unchanged.
  """
  renamed, unknown = {}, []
  for name, value in state.items():
    if name.startswith("fc.") or name.endswith(".num_batches_tracked"):
      continue
    new_name = _detectron2_name(name)
    if new_name is None:
      unknown.append(name)
    else:
      renamed[new_name] = value
  if unknown:
    raise ValueError("Not torchvision ResNet names (is a prefix such as 'module.' left?):\n" +
                     name_table.listing("unknown", sorted(unknown)))
  return renamed


def resnet_from_torchvision(state: Mapping[str, np.ndarray], depth: int) -> tuple[dict, dict]:
  """torchvision ImageNet ResNet state dict -> (params, batch_stats) of `ResNet`."""
  return resnet_from_detectron2(torchvision_to_detectron2(state), depth)


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
    return layers.make_norm(self.norm, s.out_channels, self.dtype)(y)


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


class ResNetStage(nn.Module):
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
    return max_pool_3x3_s2(x)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch's MaxPool2d(3, stride=2, padding=1): [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C].

  Max is separable, so the 3x3 window is a 1x3 window over columns, then 3x1 over rows, each a
  reduce_window on a 3-d view ([B*H, W, C], then [B, H, W'*C]): the same values as one 3x3
  reduce_window, and the same gradient, to the window's first maximum in row-major order as in
  torch (columns first: each row's first maximum, then the first row holding the window's).
  Stated so because ONNX converters lower a reduce_window to a MaxPool over every dimension,
  and ONNX runtimes pool over at most three (export.py --format onnx).
  """
  b, h, w, c = x.shape
  window = dict(init_value=-jnp.inf, computation=jax.lax.max, window_dimensions=(1, 3, 1),
                window_strides=(1, 2, 1), padding=((0, 0), (1, 1), (0, 0)))
  cols = jax.lax.reduce_window(x.reshape(b * h, w, c), **window)
  w_out = cols.shape[1]
  rows = jax.lax.reduce_window(cols.reshape(b, h, w_out * c), **window)
  return rows.reshape(b, rows.shape[1], w_out, c)


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

  # torchvision's ImageNet statistics of RGB pixels in 0..255 (the official config's
  # PIXEL_MEAN and PIXEL_STD).
  pixel_mean: ClassVar[tuple[float, float, float]] = (123.675, 116.280, 103.530)
  pixel_std: ClassVar[tuple[float, float, float]] = (58.395, 57.120, 57.375)

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

  @property
  def size_divisibility(self) -> int:
    """Images are padded to multiples of the coarsest stride, so every level halves exactly."""
    return 2**self.levels[-1]

  def is_frozen(self, path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` (inside this module's params, e.g. ("stem", "conv1",
    "kernel")) is frozen: it lies in one of the first `freeze_at` parts of FREEZABLE."""
    return path[0] in FREEZABLE[:self.freeze_at]

  def pretrained(self, weights: str) -> dict:
    """{"params", "batch_stats"} (NumPy) of a torchvision ImageNet ResNet file at the path
    `weights`, checked name by name and shape by shape against this network."""
    if self.norm != "frozen_bn":
      raise ValueError(f"Pretrained ResNet weights need norm='frozen_bn', not {self.norm!r}.")
    state = weights_lib.read_state_dict(
        weights, None, f"ResNet-{self.depth}",
        no_imagenet="Download torchvision's file (e.g. resnet50-0676ba61.pth for ResNet-50) and "
        "set model.backbone.weights to its path.")
    params, batch_stats = resnet_from_torchvision(state, self.depth)
    return {"params": params, "batch_stats": batch_stats}

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
      x = ResNetStage(blocks, self.norm, self.conv_impl, self.dtype, name=stage)(x)
      if self.is_frozen((stage,)):
        x = jax.lax.stop_gradient(x)
      features[level] = x
    return features
