"""What every benchmark shares: machine description, timing, a printed table, a JSON file."""
import json
import os
import pathlib
import platform
import resource
import time

import jax

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
# Reference outputs and real datasets: `shared/` beside the repository, or $SPARSE_RCNN_SHARED.
SHARED = pathlib.Path(os.environ.get("SPARSE_RCNN_SHARED",
                                     pathlib.Path(__file__).resolve().parents[2] / "shared"))


def machine() -> dict:
  """The machine the numbers were measured on."""
  device = jax.devices()[0]
  return {"platform": device.platform, "device_kind": device.device_kind,
          "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
          "processor": platform.processor() or platform.machine(),
          "python": platform.python_version(), "jax": jax.__version__}


def peak_memory_mb() -> dict:
  """Peak host RSS of this process, and the accelerator's peak where JAX reports it."""
  out = {"host_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
  return out


def time_compiled(fn, *args, repeats: int = 5, warmup: int = 1) -> tuple[float, float, object]:
  """(compile seconds, mean seconds per call, compiled fn) of a jitted function."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(compiled(*args))
  return compile_s, (time.perf_counter() - start) / repeats, compiled


def program_mb(compiled) -> float | None:
  """The memory a compiled program needs, from XLA's memory analysis: arguments + outputs +
  temporaries - donated aliases (None where the backend gives no analysis)."""
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, AttributeError):
    return None
  if stats is None:
    return None
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
          - stats.alias_size_in_bytes) / 2**20


def report(name: str, rows: list[dict], columns: list[str], *, details: list[dict] | None = None,
           out: pathlib.Path | None = None) -> pathlib.Path:
  """Prints rows as a table and writes {machine, rows[, details]} to `out`, by default
  benchmarks/results/NAME_PLATFORM.json."""
  widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
  print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
  print("-+-".join("-" * w for w in widths))
  for r in rows:
    print(" | ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))
  info = machine()
  path = out or RESULTS_DIR / f"{name}_{info['platform']}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  record = {"benchmark": name, "machine": info, "rows": rows}
  if details is not None:
    record["details"] = details
  path.write_text(json.dumps(record, indent=1))
  print(f"\nwrote {path}")
  return path


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return "" if v is None else str(v)
