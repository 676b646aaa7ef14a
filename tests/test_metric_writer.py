"""Metrics as JSON lines: writing, merging steps, resume, and the learning-curve summary."""
import json

import numpy as np
import pytest

from sparse_rcnn_jax.training import metric_writer
from sparse_rcnn_jax.training import metrics_file


def test_train_and_eval_lines_of_a_step_merge_and_a_rerun_step_wins(tmp_path):
  writer = metric_writer.MetricWriter(tmp_path)
  writer.write(1, {"loss": 3.0})
  writer.write(2, {"loss": 2.0, "lr": np.float32(0.5)})
  writer.write(2, {"eval/AP": 0.25})
  writer.write(2, {"loss": 1.5})  # step 2 run again after a resume
  writer.write(3, {"loss": float("nan")})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[-1]) == {"step": 3, "loss": "nan"}
  records = metrics_file.read_metrics(tmp_path / "metrics.jsonl")
  assert records == [{"step": 1, "loss": 3.0},
                     {"step": 2, "loss": 1.5, "lr": 0.5, "eval/AP": 0.25},
                     {"step": 3, "loss": "nan"}]


def test_learning_curve_windows_are_means_of_consecutive_records():
  losses = np.random.default_rng(0).uniform(1, 10, 23)
  records = [{"step": 5 * (i + 1), "loss": float(v)} for i, v in enumerate(losses)]
  records[9]["eval/AP"] = 0.1  # step 50, in the second window
  rows = metrics_file.learning_curve(records, points=4)
  edges = [0, 6, 12, 17, 23]  # round(i * 23 / 4)
  assert [r["steps"] for r in rows] == [f"{5 * (a + 1)}-{5 * b}" for a, b in zip(edges, edges[1:])]
  np.testing.assert_allclose([r["mean_loss"] for r in rows],
                             [losses[a:b].mean() for a, b in zip(edges, edges[1:])])
  assert "eval/AP" not in rows[0] and rows[1]["eval/AP"] == 0.1 and rows[3]["eval/AP"] == 0.1
  assert metrics_file.learning_curve([{"step": 1, "eval/AP": 0.3}]) == []


def test_command_prints_the_curve_and_explains_a_missing_workdir(tmp_path, capsys):
  writer = metric_writer.MetricWriter(tmp_path)
  for step in range(1, 5):
    writer.write(step, {"loss": 10.0 / step})
  metrics_file.main([str(tmp_path), "--points", "2"])
  out = capsys.readouterr().out.splitlines()
  assert out[0] == "| steps | mean_loss |"
  assert out[2:] == ["| 1-2 | 7.5 |", "| 3-4 | 2.917 |"]
  with pytest.raises(SystemExit, match="not a training workdir"):
    metrics_file.main([str(tmp_path / "nowhere")])


def test_curves_are_redrawn_after_an_evaluation_and_when_the_interval_has_passed(tmp_path):
  png = tmp_path / "metrics.png"
  writer = metric_writer.MetricWriter(tmp_path, plot_every_s=3600)
  writer.write(1, {"loss": 3.0})
  assert not png.exists()  # Within the interval: not yet.
  writer.write(1, {"eval/AP": 0.1})
  assert png.exists()
  png.unlink()
  every_write = metric_writer.MetricWriter(tmp_path, plot_every_s=0)
  every_write.write(2, {"loss": 2.0})
  assert png.exists()
  png.unlink()
  on_demand = metric_writer.MetricWriter(tmp_path, plot_every_s=None)
  on_demand.write(3, {"eval/AP": 0.2})
  assert not png.exists()
  assert on_demand.plot() == png and png.exists()


def test_a_failed_drawing_is_logged_and_training_goes_on(tmp_path, monkeypatch, caplog):
  from sparse_rcnn_jax.training import plots  # pylint: disable=g-import-not-at-top

  def broken(path):
    raise RuntimeError(f"cannot draw {path}")

  monkeypatch.setattr(plots, "save_curves", broken)
  writer = metric_writer.MetricWriter(tmp_path, plot_every_s=0)
  writer.write(1, {"loss": 1.0})
  assert writer.plot() is None and "Could not draw the curves" in caplog.text
  assert metrics_file.read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]
