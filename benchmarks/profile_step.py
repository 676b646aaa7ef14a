"""Where a step's time goes, by part of the model and kind of operation.

  python benchmarks/profile_step.py                          # model_train and head_fwd_bwd
  python benchmarks/profile_step.py --rows head_fwd_bwd --ynnpack

Compiles the rows of compare_official.py (same shapes: batch 1, 800x1216, R-50 FPN, 100
proposals), runs each under the JAX profiler and adds up the time of every XLA:CPU operation
(each thunk of the compiled program) by
  part: backbone stage, FPN, head (RoIAlign, self-attention, instance interaction, the rest
        of a stage), loss and matching;
  pass: forward or backward;
  kind: convolution (forward, input gradient, weight gradient), matmul, gather, scatter,
        host callback, copy/transpose, reduction, other fused elementwise work.
Operations run on several threads at once (large ones asynchronously, from their start to their
"end" event); each instant is split evenly among the operations running then, so the times
add up to the time when any operation ran.
"""
import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
import tempfile

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import common  # pylint: disable=g-import-not-at-top
from benchmarks.compare_official import Ours

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*? ([a-z][a-z0-9\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_WINDOW = re.compile(r"window=\{size=([\dx]+)")


def instructions(hlo_text: str) -> dict[str, tuple[str, str, str]]:
  """name -> (opcode, op_name metadata, the line) for the entry computation's instructions.

  An instruction without a name stack (a fusion or layout copy XLA made) takes the first one
  of the computation it calls, else that of its first operand that has one.
  """
  computations, current, entry = {}, None, []
  for line in hlo_text.splitlines():
    header = re.match(r"^(ENTRY )?%([\w.\-]+) ", line)
    if header:
      current = "ENTRY" if header.group(1) else header.group(2)
      computations[current] = []
    elif current is not None:
      computations[current].append(line)
  out = {}
  for line in computations.get("ENTRY", []):
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    op_name = _OP_NAME.search(line)
    name = op_name.group(1) if op_name else ""
    called = re.search(r"calls=%([\w.\-]+)", line)
    if not name and called:
      name = next((m.group(1) for l in computations.get(called.group(1), [])
                   for m in [_OP_NAME.search(l)] if m), "")
    if not name:
      operands = re.findall(r"%([\w.\-]+)", line.split("(", 2)[-1])
      name = next((out[o][1] for o in operands if o in out and out[o][1]), "")
    out[match.group(1)] = (match.group(2), name, line)
  return out


def part_of(op_name: str) -> str:
  """The model part an operation belongs to, from its name stack."""
  match = re.search(r"\((?:SparseRCNN|DynamicHead)\)\)?/(backbone/\w+|fpn|"
                    r"(?:head/)?stage\d+/(?:vmap\()?(\w+)|head)", op_name)
  if not match:
    return "loss + matching"
  if match.group(2):
    sub = match.group(2)
    return "head: " + (sub if sub in ("roi_align", "self_attn", "inst_interact") else "rest")
  return match.group(1)


def kind_of(name: str, opcode: str, line: str) -> str:
  """Kind of operation, from the opcode and XLA's name for the (fused) instruction."""
  if opcode == "convolution" or "convolution" in name:
    if "transpose(" not in line:
      return "conv forward"
    window = _WINDOW.search(line)
    size = 1
    for d in (window.group(1).split("x") if window else ()):
      size *= int(d)
    return "conv weight grad" if size > 49 else "conv input grad"
  for kind in ("custom-call", "scatter", "gather", "dot", "transpose", "copy", "reduce"):
    if opcode == kind or kind in name:
      return {"custom-call": "host callback", "transpose": "copy/transpose",
              "copy": "copy/transpose"}.get(kind, kind)
  return "fused elementwise"


def _split_overlaps(spans) -> dict:
  """Wall time per key: each instant is split evenly among the spans (start, end, key) that
  cover it, so the times add up to the time when anything ran."""
  edges = sorted([(start, 1, i) for i, (start, _, _) in enumerate(spans)]
                 + [(end, -1, i) for i, (_, end, _) in enumerate(spans)])
  out = collections.defaultdict(float)
  active, last = set(), None
  for time, change, index in edges:
    if active and last is not None:
      share = (time - last) / len(active)
      for i in active:
        out[spans[i][2]] += share
    last = time
    if change > 0:
      active.add(index)
    else:
      active.discard(index)
  return out


def profile(ours: Ours, row: str, runs: int) -> tuple[dict, float]:
  """{(part, pass, kind): seconds per run}, and the wall seconds per run (mean of `runs`
  traced runs, one trace each)."""
  compiled, args, _ = ours.fns[row]
  table = instructions(compiled.as_text())
  totals = collections.defaultdict(float)
  wall = 0.0
  for _ in range(runs):
    with tempfile.TemporaryDirectory() as tmp:
      jax.profiler.start_trace(tmp)
      jax.block_until_ready(compiled(*args))
      jax.profiler.stop_trace()
      trace = json.load(gzip.open(next(pathlib.Path(tmp).rglob("*.trace.json.gz"))))
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    wall += sum(e["dur"] for e in events
                if e["name"] == "ThunkExecutor::Execute (wait for completion)") * 1e-6 / runs
    # An operation that runs asynchronously (large matmuls, reductions) ends with an
    # "end: NAME" event; it is counted from its start to that end.
    ends = {e["name"][5:]: e["ts"] + e["dur"] for e in events if e["name"].startswith("end: ")}
    spans = []
    for event in events:
      if event["name"] in table:
        opcode, op_name, line = table[event["name"]]
        direction = "backward" if "transpose(" in op_name else "forward"
        key = (part_of(op_name), direction, kind_of(event["name"], opcode, line))
        spans.append((event["ts"], max(event["ts"] + event["dur"], ends.get(event["name"], 0)),
                      key))
    for key, seconds in _split_overlaps(spans).items():
      totals[key] += seconds * 1e-6 / runs
  return totals, wall


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", nargs="+", default=["model_train", "head_fwd_bwd"])
  parser.add_argument("--runs", type=int, default=2)
  parser.add_argument("--top", type=int, default=25, help="table lines per row")
  parser.add_argument("--ynnpack", action="store_true",
                      help="leave XLA:CPU's YNNPACK fusions on (jaxlib's default)")
  args = parser.parse_args()
  ours = Ours(args.ynnpack, rows=args.rows)
  rows = []
  for row in args.rows:
    totals, wall = profile(ours, row, args.runs)
    op_total = sum(totals.values())
    by_part = collections.defaultdict(float)
    for (part, _, _), s in totals.items():
      by_part[part] += s
    print(f"\n{row}: wall {wall * 1e3:.0f} ms, operations {op_total * 1e3:.0f} ms; by part: "
          + ", ".join(f"{p} {s / op_total:.0%}" for p, s in
                      sorted(by_part.items(), key=lambda x: -x[1])))
    for (part, direction, kind), s in sorted(totals.items(), key=lambda x: -x[1]):
      rows.append({"row": row, "part": part, "pass": direction, "kind": kind, "ms": s * 1e3,
                   "share": s / op_total})
  shown = []
  for row in args.rows:
    shown += [r for r in rows if r["row"] == row][:args.top]
  path = common.report("profile_step" + ("_ynnpack" if args.ynnpack else ""), shown,
                       ["row", "part", "pass", "kind", "ms", "share"])
  data = json.loads(path.read_text())
  data["rows"] = rows
  path.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
  main()
