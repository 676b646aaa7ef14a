"""benchmarks/device_check.py in its CPU smoke mode: every kind of row is measured once, the
matching share comes from the stand-in row, the JSON holds the machine and every row, and a
spent time budget skips the rows left instead of running past it.

The whole smoke compiles two train steps (about a minute on 2 cores) and is slow-marked; the
default suite measures its inference rows for real and checks the summary on stated rows."""
import json

import jax
import pytest

from benchmarks import device_check


@pytest.mark.slow
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


def test_smoke_inference_rows_measure_and_write_the_json(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(device_check.SMOKE, "train_batches", ())
  out = tmp_path / "device_check.json"
  table = device_check.main(["--smoke", "--out", str(out)])
  assert "images_per_s" in capsys.readouterr().out
  assert [(r["part"], r["dtype"]) for r in table] == [("inference", "float32"),
                                                      ("inference", "bfloat16")]
  assert all("error" not in r and "skipped" not in r for r in table), table
  assert all(r["images_per_s"] > 0 and r["compile_s"] > 0 and r["program_mb"] > 0
             for r in table)
  record = json.loads(out.read_text())
  assert record["machine"]["platform"] == "cpu" and len(record["rows"]) == 2
  assert not out.with_name(out.stem + ".partial.json").exists()


def test_the_plan_has_every_training_row_of_the_setting():
  rows = device_check.plan(device_check.FULL)
  training = [(r["dtype"], r["batch"], r["matcher"]) for r in rows if r["part"] == "training"]
  assert len(training) == 2 * 2 * 3 and ("bfloat16", 16, "none") in training
  assert [(r["dtype"], r["batch"]) for r in rows if r["part"] == "inference"] == [
      ("float32", 1), ("float32", 8), ("bfloat16", 1), ("bfloat16", 8)]


def test_the_summary_takes_the_matching_share_from_the_stand_in_and_sets_goals_on_gpus():
  rows = [dict(part="inference", dtype="float32", batch=8, images_per_s=80.0),
          dict(part="inference", dtype="bfloat16", batch=8, images_per_s=90.0),
          dict(part="training", dtype="float32", batch=16, matcher="scipy", step_s=0.5,
               images_per_s=32.0),
          dict(part="training", dtype="float32", batch=16, matcher="device", step_s=0.4,
               images_per_s=40.0),
          dict(part="training", dtype="float32", batch=16, matcher="none", step_s=0.3,
               images_per_s=16 / 0.3),
          dict(part="training", dtype="bfloat16", batch=16, matcher="scipy", skipped="budget")]
  gpu = device_check.summarize(rows, "gpu")
  assert gpu[2]["matching_share"] == pytest.approx(0.4)
  assert gpu[3]["matching_share"] == pytest.approx(0.25)
  assert "matching_share" not in gpu[4] and "matching_share" not in gpu[5]
  goal = device_check.TRAINING_GOAL_PER_DEVICE * jax.device_count()
  assert gpu[0]["goal"] == "meets 70" and gpu[1]["goal"] == "misses 100"
  assert gpu[2]["goal"] == f"{'meets' if 32.0 >= goal else 'misses'} {goal:g}"
  assert "goal" not in gpu[4] and "goal" not in gpu[5]
  assert all("goal" not in r for r in device_check.summarize(rows, "cpu"))


def test_a_spent_budget_skips_the_rows_left(tmp_path):
  table = device_check.main(["--smoke", "--budget_s", "0", "--out", str(tmp_path / "d.json")])
  assert len(table) == 4 and all("budget" in r["skipped"] for r in table)
