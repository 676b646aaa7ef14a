"""The learning-curve picture: series read from hand-written metrics.jsonl lines, and the PNG."""
import json

import numpy as np
import pytest
from PIL import Image

from sparse_rcnn_jax.training import metrics_file
from sparse_rcnn_jax.training import plots

LINES = [  # As MetricWriter writes them: training and evaluation scalars on separate lines.
    {"step": 10, "loss": 8.0, "weighted_loss_ce_0": 1.0, "weighted_loss_ce_1": 2.0,
     "weighted_loss_giou_0": 3.0, "weighted_loss_giou_1": 2.0, "lr": 0.1},
    {"step": 20, "loss": 6.0, "weighted_loss_ce_0": 1.0, "weighted_loss_ce_1": 1.0,
     "weighted_loss_giou_0": 2.0, "weighted_loss_giou_1": 2.0, "lr": 0.1},
    {"step": 20, "eval/AP": 0.25, "eval/AP50": 0.5, "eval/APs": -1.0},
    {"step": 30, "loss": "nan", "lr": 0.1},
    {"step": 40, "loss": 4.0, "lr": 0.1},
    {"step": 40, "eval/AP": 0.375, "eval/AP50": 0.625},
]


def _write(path, lines):
  path.write_text("".join(json.dumps(line) + "\n" for line in lines))
  return path


def _records(tmp_path, lines):
  return metrics_file.read_metrics(_write(tmp_path / "metrics.jsonl", lines))


def test_series_are_the_steps_and_values_of_the_lines_holding_the_key(tmp_path):
  records = _records(tmp_path, LINES)
  steps, loss = plots.series(records, "loss")
  assert steps.tolist() == [10, 20, 30, 40]
  np.testing.assert_array_equal(loss, [8.0, 6.0, np.nan, 4.0])  # "nan" is a gap.
  steps, ap = plots.series(records, "eval/AP")
  assert steps.tolist() == [20, 40] and ap.tolist() == [0.25, 0.375]
  steps, values = plots.series(records, "eval/AR@100")
  assert steps.shape == values.shape == (0,)
  terms = plots.term_series(records)
  assert sorted(terms) == ["loss_ce", "loss_giou"]
  assert terms["loss_ce"][0].tolist() == [10, 20] and terms["loss_ce"][1].tolist() == [3.0, 2.0]
  assert terms["loss_giou"][1].tolist() == [5.0, 4.0]


def test_smooth_is_a_trailing_mean_that_skips_nan():
  values = np.array([1.0, 3.0, np.nan, 5.0, 7.0, np.nan, np.nan])
  expected = []
  for end in range(1, len(values) + 1):  # A plain loop as the reference.
    window = [v for v in values[max(0, end - 3):end] if np.isfinite(v)]
    expected.append(np.mean(window) if window else np.nan)
  np.testing.assert_allclose(plots.smooth(values, 3), expected)
  np.testing.assert_array_equal(plots.smooth(values, 1), values)


def test_the_figure_plots_the_loss_and_the_ap_in_percent(tmp_path):
  figure = plots.draw_curves(_records(tmp_path, LINES))
  loss_ax, eval_ax = figure.axes
  curves = {line.get_label(): line for line in eval_ax.get_lines()}
  assert curves["AP"].get_xdata().tolist() == [20, 40]
  np.testing.assert_allclose(curves["AP"].get_ydata(), [25.0, 37.5])
  np.testing.assert_allclose(curves["AP50"].get_ydata(), [50.0, 62.5])
  assert "APs" not in curves  # Only AP and AP50; COCO's -1 is never drawn.
  loss = {line.get_label(): line for line in loss_ax.get_lines()}["loss"]
  assert loss.get_xdata().tolist() == [10, 20, 30, 40]
  assert loss_ax.get_yscale() == "log"


def test_a_run_without_evaluation_says_so(tmp_path):
  figure = plots.draw_curves(_records(tmp_path, [r for r in LINES if "loss" in r]))
  assert [t.get_text() for t in figure.axes[1].texts] == ["no evaluation yet"]
  assert not figure.axes[1].get_lines()


@pytest.mark.parametrize("with_eval", [True, False])
def test_save_curves_writes_a_png_beside_the_metrics(tmp_path, with_eval):
  lines = LINES if with_eval else [r for r in LINES if "loss" in r]
  path = plots.save_curves(_write(tmp_path / "metrics.jsonl", lines))
  assert path == tmp_path / "metrics.png" and not list(tmp_path.glob("*.partial"))
  with Image.open(path) as picture:
    assert picture.format == "PNG"
    assert picture.size == (plots.FIGURE_SIZE[0] * plots.DPI, plots.FIGURE_SIZE[1] * plots.DPI)


def test_command_redraws_a_workdir_and_explains_a_missing_one(tmp_path, capsys):
  _write(tmp_path / "metrics.jsonl", LINES)
  plots.main([str(tmp_path)])
  assert capsys.readouterr().out.strip() == str(tmp_path / "metrics.png")
  assert (tmp_path / "metrics.png").exists()
  with pytest.raises(SystemExit, match="not a training workdir"):
    plots.main([str(tmp_path / "nowhere")])
