"""End to end through the command lines: train.py -> eval.py -> predict.py.

The main job's config (configs/synthetic.py) shrunk by overrides to a few steps on a tiny set,
so the test runs the same code path as the README's first command.
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sparse_rcnn_jax.evaluation import visualize

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 600
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR@100")


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=TIMEOUT, check=False)
  assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
  return proc


def _overrides(data_root: pathlib.Path) -> dict:
  return {
      "data.synthetic.root": str(data_root), "data.synthetic.num_train": 12,
      "data.synthetic.num_val": 6, "data.synthetic.image_size": 64,
      "data.train_scales": (64,), "data.max_size": 64, "data.test_scale": 64,
      "data.batch_size": 4, "data.eval_batch_size": 4,
      "model.num_proposals": 8, "model.num_stages": 2, "model.hidden_dim": 32,
      "model.dim_feedforward": 64, "model.num_heads": 2, "model.dim_dynamic": 8,
      "train.num_steps": 3, "train.log_every": 1,
      "train.checkpoint_every": 2, "optimizer.warmup_steps": 1,
      # Keeps a moving average of the weights: evaluated by default, --use_ema=false for the raw.
      "train.ema_decay": 0.5}


def _config_flags(data_root: pathlib.Path, recipe: str = "") -> list[str]:
  """The command line's --config and overrides of configs/synthetic.py[:recipe]."""
  config = str(ROOT / "configs" / "synthetic.py") + (f":{recipe}" if recipe else "")
  return ["--config", config] + [f"--config.{k}={v}" for k, v in _overrides(data_root).items()]


def _config(data_root: pathlib.Path, recipe: str = ""):
  """The config of `_config_flags(data_root, recipe)`, built here."""
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  config = synthetic.get_config(recipe)
  for name, value in _overrides(data_root).items():
    *parents, leaf = name.split(".")
    node = config
    for key in parents:
      node = node[key]
    node[leaf] = value
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  base = tmp_path_factory.mktemp("cli")
  flags = _config_flags(base / "data")
  proc = _run("train.py", *flags, "--workdir", str(base / "work"))
  return base, flags, proc


def test_train_prints_the_table_and_writes_results(trained):
  base, _, proc = trained
  work = base / "work"
  assert "COCO evaluation at step 3 (6 images" in proc.stdout
  for name in METRICS:
    assert name in proc.stdout
  metrics = json.loads((work / "eval_step3.json").read_text())
  assert all(0.0 <= metrics[k] <= 1.0 or metrics[k] == -1.0 for k in METRICS)
  detections = json.loads((work / "detections_step3.json").read_text())
  per_image = np.bincount([d["image_id"] for d in detections])
  assert per_image.max() <= 8 and len({d["image_id"] for d in detections}) == 6
  records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
  assert sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit()) \
      == [2, 3]
  pictures = sorted(work.glob("*.png"))
  assert pictures and all(Image.open(p).size[0] > 0 for p in pictures)


def test_running_the_same_command_again_resumes_at_the_end(trained):
  base, flags, _ = trained
  proc = _run("train.py", *flags, "--workdir", str(base / "work"), "--eval=false")
  assert "Resumed from step 3" in proc.stderr
  records = (base / "work" / "metrics.jsonl").read_text().splitlines()
  assert len([r for r in records if '"loss"' in r]) == 3


def test_eval_reproduces_the_training_evaluation(trained, tmp_path):
  base, flags, _ = trained
  proc = _run("eval.py", *flags, "--workdir", str(base / "work"), "--out", str(tmp_path))
  assert "AP50" in proc.stdout
  ours = json.loads((tmp_path / "eval_step3.json").read_text())
  theirs = json.loads((base / "work" / "eval_step3.json").read_text())
  for name in METRICS:
    assert ours[name] == pytest.approx(theirs[name], abs=1e-6)


def test_eval_stages_gives_every_stage_and_early_exit_matches_it(trained, tmp_path):
  """eval.py --stages: one AP per head stage, the last equal to the training's evaluation;
  config.model.eval_stages=1 evaluates exactly the first stage's detections."""
  base, flags, _ = trained
  proc = _run("eval.py", *flags, "--workdir", str(base / "work"), "--out", str(tmp_path),
              "--stages")
  assert "COCO box AP of each head stage" in proc.stdout
  per_stage = json.loads((tmp_path / "eval_step3_stages.json").read_text())
  assert len(per_stage) == 2
  theirs = json.loads((base / "work" / "eval_step3.json").read_text())
  for name in METRICS:
    assert per_stage[-1][name] == pytest.approx(theirs[name], abs=1e-6)
  _run("eval.py", *flags, "--config.model.eval_stages=1", "--workdir", str(base / "work"),
       "--out", str(tmp_path / "first"))
  first = json.loads((tmp_path / "first" / "eval_step3.json").read_text())
  for name in METRICS:
    assert first[name] == pytest.approx(per_stage[0][name], abs=1e-6)


def test_eval_without_the_moving_average_evaluates_the_trained_weights(trained, tmp_path):
  base, flags, proc = trained
  assert "the weights' moving average" in proc.stdout
  _run("eval.py", *flags, "--workdir", str(base / "work"), "--out", str(tmp_path),
       "--use_ema=false")
  raw = json.loads((tmp_path / "detections_step3_raw.json").read_text())
  averaged = json.loads((base / "work" / "detections_step3.json").read_text())
  assert json.loads((tmp_path / "eval_step3_raw.json").read_text())["num_images"] == 6
  assert raw and averaged
  assert {d["score"] for d in raw}.isdisjoint(d["score"] for d in averaged)


def test_predict_draws_images_and_writes_detections(trained, tmp_path):
  base, flags, _ = trained
  images = sorted((base / "data").rglob("*.png"))[:2] or sorted((base / "data").rglob("*.jpg"))[:2]
  assert images
  proc = _run("predict.py", *flags, "--workdir", str(base / "work"), "--images",
              ",".join(map(str, images)), "--out", str(tmp_path / "pred"),
              "--threshold", "0.0")
  assert "2 image(s)" in proc.stdout
  for image in images:
    # Drawn enlarged by a whole factor, so that labels are legible on small images.
    width, height = Image.open(image).size
    factor = visualize.upscale_factor(height, width)
    assert factor > 1
    assert Image.open(tmp_path / "pred" / f"{image.stem}.png").size == (factor * width,
                                                                        factor * height)
    assert (tmp_path / "pred" / f"{image.stem}_stages.png").exists()
  records = json.loads((tmp_path / "pred" / "detections.json").read_text())
  assert {r["file"] for r in records} == set(map(str, images))
  assert all(len(r["box_xyxy"]) == 4 and 0.0 <= r["score"] <= 1.0 for r in records)


def test_the_workdir_alone_predicts_with_class_names_and_evaluates(trained, tmp_path):
  """As a new user: the data folder moved away, predict.py needs only --workdir and images
  (the run saved its config and class names); with the folder back, eval.py --workdir alone
  evaluates it."""
  base, _, _ = trained
  work, data, moved = base / "work", base / "data", tmp_path / "moved"
  images = tmp_path / "images"
  images.mkdir()
  for source in sorted(data.rglob("*.jpg"))[:2]:
    (images / source.name).write_bytes(source.read_bytes())
  data.rename(moved)
  try:
    proc = _run("predict.py", "--workdir", str(work), "--images", str(images), "--out",
                str(tmp_path / "pred"), "--threshold", "0.0")
    assert "2 image(s)" in proc.stdout
    records = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert records and {r["class"] for r in records} <= {
        "disc", "ring", "rectangle", "triangle", "cross"}
    assert len(list((tmp_path / "pred").glob("*_stages.png"))) == 2
  finally:
    moved.rename(data)
  proc = _run("eval.py", "--workdir", str(work), "--out", str(tmp_path / "eval"))
  assert "AP50" in proc.stdout
  ours = json.loads((tmp_path / "eval" / "eval_step3.json").read_text())
  theirs = json.loads((work / "eval_step3.json").read_text())
  assert ours["AP"] == pytest.approx(theirs["AP"], abs=1e-6)


def _failing(script: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=TIMEOUT, check=False)
  assert proc.returncode != 0, f"{script} did not fail:\n{proc.stdout[-2000:]}"
  return proc


def test_eval_with_a_config_that_keeps_no_average_uses_the_runs_own(trained, tmp_path):
  """A --config saying train.ema_decay=0 on a run that kept a moving average: the checkpoint's
  layout is the run's, so it restores, and evaluates the run's default weights."""
  base, flags, _ = trained
  proc = _run("eval.py", *flags, "--config.train.ema_decay=0.0", "--workdir",
              str(base / "work"), "--out", str(tmp_path))
  assert "AP50" in proc.stdout
  ours = json.loads((tmp_path / "detections_step3.json").read_text())
  assert ours == json.loads((base / "work" / "detections_step3.json").read_text())


def test_a_config_of_another_model_is_refused_with_what_differs(trained, tmp_path):
  base, flags, _ = trained
  for script, extra in (("eval.py", ()), ("export.py", ("--out", str(tmp_path / "m.jaxexport")))):
    proc = _failing(script, *flags, "--config.model.num_proposals=9", "--workdir",
                    str(base / "work"), *extra)
    assert "does not fit the model of the given --config" in proc.stderr
    assert "model.num_proposals: 8 in the run, 9 in --config" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_eval_of_an_official_checkpoint(trained, tmp_path):
  """eval.py --checkpoint: an official checkpoint file (written by model/official.py from a
  frozen-batch-norm ResNet model's random weights) gives the AP of those weights evaluated
  here, and one of another head is refused, naming both heads."""
  # pylint: disable=g-import-not-at-top
  import jax
  from sparse_rcnn_jax.model import detector
  from sparse_rcnn_jax.evaluation import inference
  from sparse_rcnn_jax.training import model_state
  from sparse_rcnn_jax import sharding
  from sparse_rcnn_jax.convert import checkpoint_io
  from sparse_rcnn_jax.model import official
  from sparse_rcnn_jax.data import pipeline
  base, _, _ = trained
  flags = _config_flags(base / "data", "scratch") + ["--config.model.backbone.norm=frozen_bn"]
  config = _config(base / "data", "scratch")
  config.model.backbone.norm = "frozen_bn"
  source = pipeline.load_source(config.data, "eval")
  model = detector.build_model(config.model, source.num_classes)
  variables = model_state.init_variables(model, config, jax.random.PRNGKey(3))
  checkpoint_io.save_state_dict(
      official.to_official(variables, model.head, config.model.backbone.depth),
      tmp_path / "model.npz")
  _run("eval.py", *flags, "--checkpoint", str(tmp_path / "model.npz"))
  ours = json.loads((tmp_path / "eval_official.json").read_text())
  mesh = sharding.make_mesh(jax.devices()[:1])
  theirs = inference.evaluate_split(inference.make_predict_fn(model, mesh), variables, config,
                                    mesh, source, size_divisibility=32)
  for name in METRICS:
    assert ours[name] == pytest.approx(theirs[name], abs=1e-6)
  proc = _failing("eval.py", *flags, "--config.model.num_stages=1", "--checkpoint",
                  str(tmp_path / "model.npz"))
  assert "num_stages=2" in proc.stderr and "num_stages=1" in proc.stderr


def test_bad_arguments_are_explained(trained, tmp_path):
  base, flags, _ = trained
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(ROOT / "predict.py"), *flags, "--workdir",
                         str(base / "work"), "--images", str(tmp_path / "missing.jpg")],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT,
                        check=False)
  assert proc.returncode != 0 and "No such image file or folder" in proc.stderr
  proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=TIMEOUT, check=False)
  assert proc.returncode != 0 and "exactly one of --workdir or --checkpoint" in proc.stderr


# Slow: the whole command line. bfloat16 and the device matcher stay in the default suite through
# test_precision.py, test_matcher.py and test_sharded_loss.py.
@pytest.mark.slow
def test_bfloat16_with_the_device_matcher_trains_and_evaluates(trained, tmp_path):
  """The pod settings from the README's command line: same job, bfloat16 and no host matching."""
  base, flags, _ = trained
  work = tmp_path / "work"
  proc = _run("train.py", *flags, "--workdir", str(work), "--config.model.dtype=bfloat16",
              "--config.loss.matcher=device")
  assert "COCO evaluation at step 3 (6 images" in proc.stdout
  records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 3 and np.isfinite(losses).all()
  saved = json.loads((work / "config.json").read_text())
  assert saved["model"]["dtype"] == "bfloat16" and saved["loss"]["matcher"] == "device"
