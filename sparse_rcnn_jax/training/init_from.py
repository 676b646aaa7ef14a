"""Starting a run from another's weights (`model.init_from`): a source variables tree merged into
the freshly initialized one, leaf by leaf, where path and shape agree.

Both trees are {"params": ..., "batch_stats": ...} of nested dicts of arrays; a leaf is named by
its path, e.g. "params/head/stage0/class_logits/kernel". A target leaf takes the source's value
when the source has the same path with the same shape, and keeps its initial value otherwise
(a class layer for another number of classes, a stage the source lacks). `Report` says which,
grouped into a few log lines (`Report.lines`):

  model.init_from workdirs/bccd (step 5200, its moving average of the weights): loaded 204 of 210 tensors (2,073,156 values)
    its model config differs: num_classes 3 -> 5
    kept at initialization, shape differs (6 tensors):
      params/head/stage{0-2}/class_logits/bias: [3] in the source, [5] here (3 tensors)
      params/head/stage{0-2}/class_logits/kernel: [64, 3] in the source, [64, 5] here (3 tensors)

(configs/custom.py's model from BCCD's 3 classes to 5.) Missing and unused tensors are grouped
by their first three path parts, e.g. "params/head/stage{3-5}" with their count.
"""
import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

Shape = tuple[int, ...]
_MAX_GROUPS = 8  # Lines per bucket of the report; the rest is counted.
# Missing and unused tensors are grouped by this many path parts: "params/head/stage2".
_GROUP_DEPTH = 3


@dataclasses.dataclass(frozen=True)
class Report:
  """What `merge` did. Paths are "/"-joined, e.g. "params/fpn/fpn_output5/bias".

  Attributes:
    loaded: target paths that took the source's value.
    num_values: the number of values loaded.
    mismatched: (path, source shape, target shape) of paths in both trees whose shapes differ;
      kept at initialization.
    missing: target paths the source lacks; kept at initialization.
    unused: source paths the target lacks.
    source: what the source is, for the first line.
    notes: how the source's model config differs from the target's ("num_classes 3 -> 5").
  """
  loaded: tuple[str, ...]
  num_values: int
  mismatched: tuple[tuple[str, Shape, Shape], ...]
  missing: tuple[str, ...]
  unused: tuple[str, ...]
  source: str = "the source"
  notes: tuple[str, ...] = ()

  def lines(self) -> list[str]:
    """The report as a few log lines: totals, then each non-empty bucket grouped."""
    total = len(self.loaded) + len(self.mismatched) + len(self.missing)
    lines = [f"model.init_from {self.source}: loaded {len(self.loaded)} of {total} tensors "
             f"({self.num_values:,} values)"]
    if self.notes:
      lines.append("  its model config differs: " + ", ".join(self.notes))
    if self.mismatched:
      groups = _group(self.mismatched, lambda m: (m[0].split("/"), (m[1], m[2])))
      lines.append(f"  kept at initialization, shape differs ({_tensors(len(self.mismatched))}):")
      lines += _group_lines(groups, lambda shapes: f": {_shape(shapes[0])} in the source, "
                                                   f"{_shape(shapes[1])} here")
    for title, paths in (("kept at initialization, not in the source", self.missing),
                         ("in the source, unused", self.unused)):
      if paths:
        groups = _group(paths, lambda p: (p.split("/")[:_GROUP_DEPTH], None))
        lines.append(f"  {title} ({_tensors(len(paths))}):")
        lines += _group_lines(groups, lambda _: "")
    return lines


def merge(source: Mapping[str, Any], target: Mapping[str, Any]) -> tuple[dict, Report]:
  """`target` with every leaf whose path and shape are also the source's replaced by the
  source's value (cast to the target leaf's dtype); the Report of what was loaded and what not.

  Args:
    source: variables to load from, e.g. {"params": ..., "batch_stats": ...}.
    target: the freshly initialized variables of the same form; its structure is the result's.
  """
  src = traverse_util.flatten_dict(dict(source), sep="/")
  tgt = traverse_util.flatten_dict(dict(target), sep="/", keep_empty_nodes=True)
  merged, loaded, mismatched, missing, num_values = {}, [], [], [], 0
  for path, value in tgt.items():
    merged[path] = value
    if value is traverse_util.empty_node:
      continue
    if path not in src:
      missing.append(path)
    elif np.shape(src[path]) != np.shape(value):
      mismatched.append((path, tuple(np.shape(src[path])), tuple(np.shape(value))))
    else:
      merged[path] = _as_dtype(src[path], value.dtype)
      loaded.append(path)
      num_values += math.prod(np.shape(value))
  unused = tuple(sorted(set(src) - set(tgt)))
  report = Report(tuple(loaded), num_values, tuple(sorted(mismatched)), tuple(sorted(missing)),
                  unused)
  return traverse_util.unflatten_dict(merged, sep="/"), report


def differences(source: Mapping[str, Any], target: Mapping[str, Any]) -> tuple[str, ...]:
  """The notes of a Report: `key source_value -> target_value` for each key of both mappings
  whose values differ, in `target`'s order."""
  return tuple(f"{k} {source[k]} -> {v}" for k, v in target.items()
               if k in source and source[k] != v)


def _as_dtype(value, dtype):
  return value if value.dtype == dtype else np.asarray(value).astype(dtype)


def _tensors(count: int) -> str:
  return f"{count} tensor{'s' if count != 1 else ''}"


def _shape(shape: Shape) -> str:
  return "[" + ", ".join(map(str, shape)) + "]"


def _group(items, key) -> dict[tuple, list[list[int]]]:
  """Items grouped by their path with every run of digits taken out ("stage#"), and by an extra
  key; each group holds the numbers taken out of each of its paths, in order."""
  groups = {}
  for item in items:
    parts, extra = key(item)
    path = "/".join(parts)
    pattern = re.sub(r"\d+", "#", path)
    groups.setdefault((pattern, extra), []).append([int(n) for n in re.findall(r"\d+", path)])
  return groups


def _group_lines(groups: dict, describe) -> list[str]:
  """One line per group: its path with the numbers of its members ("stage{0-3}"), what
  `describe(extra key)` adds, and how many tensors it holds when more than one."""
  lines = []
  for (pattern, extra), numbers in list(groups.items())[:_MAX_GROUPS]:
    columns = iter(_numbers(sorted(set(column))) for column in zip(*numbers))
    path = re.sub("#", lambda _: next(columns), pattern)
    count = f" ({_tensors(len(numbers))})" if len(numbers) > 1 else ""
    lines.append(f"    {path}{describe(extra)}{count}")
  if len(groups) > _MAX_GROUPS:
    lines.append(f"    ... and {len(groups) - _MAX_GROUPS} more groups")
  return lines


def _numbers(values: list[int]) -> str:
  """[2] -> "2", [0, 1] -> "{0,1}", [0, 2, 3, 4] -> "{0,2-4}"."""
  if len(values) == 1:
    return str(values[0])
  runs = []
  for v in values:
    if runs and v == runs[-1][1] + 1:
      runs[-1][1] = v
    else:
      runs.append([v, v])
  return "{" + ",".join(str(a) if a == b else f"{a},{b}" if b == a + 1 else f"{a}-{b}"
                        for a, b in runs) + "}"
