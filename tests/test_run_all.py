"""benchmarks/run_all.py end to end on its smallest setting: every row runs in its own process,
the summary has one line per inference row and per training combination, and the JSON holds
the machine and every measured row."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow   # two minutes: three rows, each a fresh process that compiles
def test_quick_run_writes_the_summary_and_every_row(tmp_path):
  out = tmp_path / "run_all.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--repeats", "1",
       "--dtypes", "bfloat16", "--matchers", "device", "--out", str(out)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "images_per_s" in proc.stdout and "matching_share" in proc.stdout
  record = json.loads(out.read_text())
  assert record["machine"]["platform"] == "cpu"
  details = record["details"]
  assert [(r["part"], r["batch"]) for r in details] == [
      ("inference", 1), ("inference", 2), ("training", 2)]
  assert all("error" not in r for r in details), details
  assert all(r["dtype"] == "bfloat16" and r["images_per_s"] > 0 for r in record["rows"])
  training = [r for r in record["rows"] if r["part"] == "training"]
  assert len(training) == 1 and training[0]["matcher"] == "device"
  assert -1.0 < training[0]["matching_share"] < 1.0
  assert training[0]["peak_mb"] > 0 and training[0]["compile_s"] > 0
