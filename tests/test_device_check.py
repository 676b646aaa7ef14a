"""benchmarks/device_check.py in its CPU smoke mode: every kind of row is measured once, the
matching share comes from the stand-in row, the JSON holds the machine and every row, and a
spent time budget skips the rows left instead of running past it."""
import json

from benchmarks import device_check


def test_smoke_mode_measures_every_part(tmp_path, capsys):
  out = tmp_path / "device_check.json"
  table = device_check.main(["--smoke", "--out", str(out)])
  printed = capsys.readouterr().out
  assert "images_per_s" in printed and "matching_share" in printed
  assert [(r["part"], r["dtype"], r.get("matcher")) for r in table] == [
      ("inference", "float32", None), ("inference", "bfloat16", None),
      ("training", "float32", "device"), ("training", "float32", "none")]
  assert all("error" not in r and "skipped" not in r for r in table), table
  assert all(r["images_per_s"] > 0 and r["compile_s"] > 0 for r in table)
  assert all(r["program_mb"] > 0 for r in table)
  device, standin = table[2], table[3]
  assert device["matching_share"] == 1.0 - standin["step_s"] / device["step_s"]
  record = json.loads(out.read_text())
  assert record["machine"]["platform"] == "cpu" and len(record["rows"]) == 4
  assert not out.with_name(out.stem + ".partial.json").exists()


def test_a_spent_budget_skips_the_rows_left(tmp_path):
  table = device_check.main(["--smoke", "--budget_s", "0", "--out", str(tmp_path / "d.json")])
  assert len(table) == 4 and all("budget" in r["skipped"] for r in table)
