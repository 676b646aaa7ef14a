"""FPN weights between detectron2 state dicts (`fpn_lateral{l}.*`, `fpn_output{l}.*`) and the
params of `fpn.FPN`, through one name table (convert/name_table.py) for both directions.

Names carry no checkpoint prefix: callers strip "backbone." first. NumPy only; exact both ways.
"""
from collections.abc import Iterable, Mapping
import re
from typing import Any

import numpy as np

from sparse_rcnn_jax.convert import name_table
from sparse_rcnn_jax.convert.name_table import Entry


def _fpn_table(levels: Iterable[int], channels: int | None) -> dict[str, Entry]:
  """detectron2 FPN names; `channels` None accepts any width (it is checked elsewhere)."""
  table = {}
  for level in levels:
    for kind, kernel_size, in_channels in (("lateral", 1, None), ("output", 3, channels)):
      name = f"fpn_{kind}{level}"
      table[f"{name}.weight"] = Entry(("params", name, "kernel"),
                                      (channels, in_channels, kernel_size, kernel_size))
      table[f"{name}.bias"] = Entry(("params", name, "bias"), (channels,))
  return table


def _fpn_channels(weight: Any, out_axis: int) -> int | None:
  """FPN width read from an output conv weight, or None (check shapes only) when unusable."""
  return np.shape(weight)[out_axis] if np.ndim(weight) == 4 else None


def fpn_from_detectron2(state: Mapping[str, np.ndarray],
                        in_levels: tuple[int, ...] = (2, 3, 4, 5)) -> dict:
  """detectron2 FPN state dict (`fpn_lateral{l}.*`, `fpn_output{l}.*`, without "backbone.")
  -> params of `fpn.FPN(out_channels, in_levels)`."""
  channels = _fpn_channels(state.get(f"fpn_output{in_levels[-1]}.weight"), 0)
  return name_table.from_torch(state, _fpn_table(in_levels, channels),
                               "detectron2 FPN state dict")["params"]


def fpn_to_detectron2(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Inverse of `fpn_from_detectron2`; the levels are those of the `fpn_lateral{l}` in params."""
  levels = sorted(int(m[1]) for m in map(re.compile(r"fpn_lateral(\d+)").fullmatch, params) if m)
  if not levels:
    raise ValueError(f"FPN params have no fpn_lateral{{l}} entries; got {sorted(params)}.")
  kernel = params.get(f"fpn_output{levels[-1]}", {}).get("kernel")
  return name_table.to_torch_state({"params": params},
                                   _fpn_table(levels, _fpn_channels(kernel, -1)), "FPN params")
