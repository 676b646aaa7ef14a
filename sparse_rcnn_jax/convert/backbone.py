"""ResNet and FPN weights between PyTorch state dicts (detectron2, torchvision) and flax trees.

NumPy only: names are mapped and conv weights transposed between PyTorch's [O, I, kH, kW] and
flax's [kH, kW, I, O]; values are never changed, so both directions are exact. Names carry no
checkpoint prefix: callers strip "backbone.bottom_up." (ResNet) and "backbone." (FPN) first.
Every function checks names and shapes against the architecture (`resnet.resnet_spec`) and
raises a ValueError listing all missing, unexpected and wrongly shaped entries.

Only the frozen-batch-norm ResNet has pretrained weights; its norm values go to "batch_stats".
"""
from collections.abc import Iterable, Mapping
import re
from typing import Any, NamedTuple

import numpy as np
from flax import traverse_util

from sparse_rcnn_jax.backbones.resnet import BATCH_NORM_STATS, ConvSpec, resnet_spec

Shape = tuple[int | None, ...]  # None: any size.
_MAX_LISTED = 20


class _Entry(NamedTuple):
  """Where a PyTorch tensor goes: its flax path (first the collection) and its PyTorch shape."""
  path: tuple[str, ...]
  shape: Shape


def _to_flax(array: Any) -> np.ndarray:
  """Conv weight [O, I, kH, kW] -> [kH, kW, I, O]; other arrays unchanged."""
  array = np.asarray(array)
  return np.ascontiguousarray(array.transpose(2, 3, 1, 0)) if array.ndim == 4 else array


def _to_torch(array: Any) -> np.ndarray:
  """Conv kernel [kH, kW, I, O] -> [O, I, kH, kW]; other arrays unchanged."""
  array = np.asarray(array)
  return np.ascontiguousarray(array.transpose(3, 2, 0, 1)) if array.ndim == 4 else array


def _listing(title: str, items: list[str]) -> str:
  shown = ", ".join(items[:_MAX_LISTED])
  more = f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
  return f"  {len(items)} {title}: {shown}{more}"


def _check(state: Mapping[str, np.ndarray], expected: Mapping[str, Shape], what: str) -> None:
  """Raises a ValueError listing every missing, unexpected or wrongly shaped name of `state`."""
  def fits(shape: tuple[int, ...], want: Shape) -> bool:
    return len(shape) == len(want) and all(w is None or s == w for s, w in zip(shape, want))

  def text(shape: Shape) -> str:
    return "(" + ", ".join("any" if d is None else str(d) for d in shape) + ")"

  missing = sorted(set(expected) - set(state))
  unexpected = sorted(set(state) - set(expected))
  wrong = [f"{name} {text(np.shape(state[name]))} (expected {text(expected[name])})"
           for name in sorted(set(state) & set(expected))
           if not fits(np.shape(state[name]), expected[name])]
  if missing or unexpected or wrong:
    lines = [f"{what} does not match the architecture:"]
    lines += [_listing(title, items) for title, items in
              (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
    raise ValueError("\n".join(lines))


def _from_torch(state: Mapping[str, Any], table: Mapping[str, _Entry], what: str) -> dict:
  """PyTorch state dict -> {collection: flax tree}, after checking it against `table`."""
  _check(state, {name: entry.shape for name, entry in table.items()}, what)
  return traverse_util.unflatten_dict(
      {entry.path: _to_flax(state[name]) for name, entry in table.items()})


def _to_torch_state(trees: Mapping[str, Any], table: Mapping[str, _Entry], what: str) -> dict:
  """{collection: flax tree} -> PyTorch state dict, checked against `table`.

  Flax paths that the table does not know keep a "/"-joined name so the check reports them.
  """
  name_of = {entry.path: name for name, entry in table.items()}
  state = {name_of.get(path, "/".join(path)): _to_torch(value)
           for path, value in traverse_util.flatten_dict(trees).items()}
  _check(state, {name: entry.shape for name, entry in table.items()}, what)
  return state


def _conv_entries(name: str, path: tuple[str, ...], conv: ConvSpec) -> dict[str, _Entry]:
  """detectron2's `name.weight` and `name.norm.*` of one conv with frozen batch norm."""
  k = conv.kernel_size
  entries = {f"{name}.weight": _Entry(("params", *path, "kernel"),
                                      (conv.out_channels, conv.in_channels, k, k))}
  for stat in BATCH_NORM_STATS:
    entries[f"{name}.norm.{stat}"] = _Entry(("batch_stats", *path, "norm", stat),
                                            (conv.out_channels,))
  return entries


def _resnet_table(depth: int, width: int) -> dict[str, _Entry]:
  """Every detectron2 ResNet name (e.g. `res3.0.shortcut.norm.bias`) with its flax place."""
  spec = resnet_spec(depth, width)
  table = _conv_entries(f"stem.{spec.stem.name}", ("stem", spec.stem.name), spec.stem)
  for stage, blocks in spec.stages.items():
    for j, block in enumerate(blocks):
      for conv in block.convs + ((block.shortcut,) if block.shortcut else ()):
        table.update(_conv_entries(f"{stage}.{j}.{conv.name}", (stage, f"block{j}", conv.name),
                                   conv))
  return table


def _stem_width(weight: Any, out_axis: int, where: str) -> int:
  """The ResNet width (stem channels), read from the stem conv weight."""
  if np.ndim(weight) != 4:
    raise ValueError(f"Cannot tell the ResNet width: {where} is missing or not a 4-D conv weight.")
  return np.shape(weight)[out_axis]


def resnet_from_detectron2(state: Mapping[str, np.ndarray], depth: int) -> tuple[dict, dict]:
  """detectron2 ResNet state dict (names without "backbone.bottom_up.") -> (params, batch_stats).

  The width is read from `stem.conv1.weight`. The result fits `resnet.ResNet(depth, width,
  norm="frozen_bn")`: `apply({"params": params, "batch_stats": batch_stats}, images)`.
  """
  width = _stem_width(state.get("stem.conv1.weight"), 0,
                      "'stem.conv1.weight' (for torchvision names use resnet_from_torchvision)")
  trees = _from_torch(state, _resnet_table(depth, width),
                      f"detectron2 ResNet-{depth} (width {width}) state dict")
  return trees["params"], trees["batch_stats"]


def resnet_to_detectron2(params: Mapping[str, Any], batch_stats: Mapping[str, Any],
                         depth: int) -> dict[str, np.ndarray]:
  """Inverse of `resnet_from_detectron2`: detectron2 names, PyTorch layouts, NumPy arrays."""
  kernel = params.get("stem", {}).get("conv1", {}).get("kernel")
  width = _stem_width(kernel, -1, "params['stem']['conv1']['kernel']")
  return _to_torch_state({"params": params, "batch_stats": batch_stats},
                         _resnet_table(depth, width), f"ResNet-{depth} (width {width}) variables")


def _fpn_table(levels: Iterable[int], channels: int | None) -> dict[str, _Entry]:
  """detectron2 FPN names; `channels` None accepts any width (it is checked elsewhere)."""
  table = {}
  for level in levels:
    for kind, kernel_size, in_channels in (("lateral", 1, None), ("output", 3, channels)):
      name = f"fpn_{kind}{level}"
      table[f"{name}.weight"] = _Entry(("params", name, "kernel"),
                                       (channels, in_channels, kernel_size, kernel_size))
      table[f"{name}.bias"] = _Entry(("params", name, "bias"), (channels,))
  return table


def _fpn_channels(weight: Any, out_axis: int) -> int | None:
  """FPN width read from an output conv weight, or None (check shapes only) when unusable."""
  return np.shape(weight)[out_axis] if np.ndim(weight) == 4 else None


def fpn_from_detectron2(state: Mapping[str, np.ndarray],
                        in_levels: tuple[int, ...] = (2, 3, 4, 5)) -> dict:
  """detectron2 FPN state dict (`fpn_lateral{l}.*`, `fpn_output{l}.*`, without "backbone.")
  -> params of `fpn.FPN(out_channels, in_levels)`."""
  channels = _fpn_channels(state.get(f"fpn_output{in_levels[-1]}.weight"), 0)
  return _from_torch(state, _fpn_table(in_levels, channels), "detectron2 FPN state dict")["params"]


def fpn_to_detectron2(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Inverse of `fpn_from_detectron2`; the levels are those of the `fpn_lateral{l}` in params."""
  levels = sorted(int(m[1]) for m in map(re.compile(r"fpn_lateral(\d+)").fullmatch, params) if m)
  if not levels:
    raise ValueError(f"FPN params have no fpn_lateral{{l}} entries; got {sorted(params)}.")
  kernel = params.get(f"fpn_output{levels[-1]}", {}).get("kernel")
  return _to_torch_state({"params": params}, _fpn_table(levels, _fpn_channels(kernel, -1)),
                         "FPN params")


_STATS = "|".join(BATCH_NORM_STATS)
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
                     _listing("unknown", sorted(unknown)))
  return renamed


def resnet_from_torchvision(state: Mapping[str, np.ndarray], depth: int) -> tuple[dict, dict]:
  """torchvision ImageNet ResNet state dict -> (params, batch_stats) of `resnet.ResNet`."""
  return resnet_from_detectron2(torchvision_to_detectron2(state), depth)
