"""Name tables: PyTorch state dicts <-> flax variable trees, one table for both directions.

A table maps each PyTorch name (e.g. `layer1.0.conv1.weight`) to an `Entry`: the flax path it
goes to (first the collection: "params", "batch_stats", or a tree of its own such as a
classifier's) and its PyTorch shape. An entry without a path names a tensor that is known but
not used (a batch norm's `num_batches_tracked` counter). Values are never changed, only laid
out: conv weights [O, I, kH, kW] <-> kernels [kH, kW, I, O], linear weights [O, I] <-> [I, O];
so both directions are exact. NumPy only.

Every conversion checks the state dict against the whole table first and raises one ValueError
listing every missing, unexpected and wrongly shaped name.
"""
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from flax import traverse_util

Shape = tuple[int | None, ...]  # None: any size.
_MAX_LISTED = 20


class Entry(NamedTuple):
  """Where a PyTorch tensor goes: its flax path (first the collection), or None for a tensor
  that is read and checked but not used; and its PyTorch shape."""
  path: tuple[str, ...] | None
  shape: Shape


def to_flax(array: Any) -> np.ndarray:
  """Conv weight [O, I, kH, kW] -> [kH, kW, I, O]; linear weight [O, I] -> [I, O]; other
  arrays unchanged."""
  array = np.asarray(array)
  if array.ndim == 4:
    return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
  return np.ascontiguousarray(array.T) if array.ndim == 2 else array


def to_torch(array: Any) -> np.ndarray:
  """Inverse of `to_flax`: kernel [kH, kW, I, O] -> [O, I, kH, kW]; [I, O] -> [O, I]."""
  array = np.asarray(array)
  if array.ndim == 4:
    return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
  return np.ascontiguousarray(array.T) if array.ndim == 2 else array


def listing(title: str, items: list[str]) -> str:
  """"  3 missing: a, b, c" with at most 20 names shown."""
  shown = ", ".join(items[:_MAX_LISTED])
  more = f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
  return f"  {len(items)} {title}: {shown}{more}"


def check(state: Mapping[str, Any], expected: Mapping[str, Shape], what: str) -> None:
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
    lines += [listing(title, items) for title, items in
              (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
    raise ValueError("\n".join(lines))


def from_torch(state: Mapping[str, Any], table: Mapping[str, Entry], what: str) -> dict:
  """PyTorch state dict -> {collection: flax tree}, after checking it against `table` (a
  tensor the table knows but does not use may be absent)."""
  check(state, {name: entry.shape for name, entry in table.items() if entry.path or name in state},
        what)
  return traverse_util.unflatten_dict(
      {entry.path: to_flax(state[name]) for name, entry in table.items() if entry.path})


def to_torch_state(trees: Mapping[str, Any], table: Mapping[str, Entry], what: str) -> dict:
  """{collection: flax tree} -> PyTorch state dict, checked against the used entries of `table`.

  Flax paths that the table does not know keep a "/"-joined name so the check reports them.
  """
  used = {name: entry for name, entry in table.items() if entry.path}
  name_of = {entry.path: name for name, entry in used.items()}
  state = {name_of.get(path, "/".join(path)): to_torch(value)
           for path, value in traverse_util.flatten_dict(trees).items()}
  check(state, {name: entry.shape for name, entry in used.items()}, what)
  return state
