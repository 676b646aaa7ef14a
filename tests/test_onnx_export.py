"""The ONNX model (onnx_export.py, export.py --format onnx) run by onnxruntime in a fresh process
that imports neither JAX nor this package, against the jitted predict function, on real
photos: the tiny model through the command line on a workdir, and the custom recipe's model
(EfficientNet-Lite0 with its ImageNet weights, depthwise convolutions); and the errors a user
sees."""
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import custom
from sparse_rcnn_jax.evaluation import onnx_export
from sparse_rcnn_jax.model import detector
from sparse_rcnn_jax.training import model_state
from photos import photos
from test_export import INFO, _env, _export_cli, _jitted_detections, _random_variables
from test_export import workdir  # pylint: disable=unused-import  (the tiny model's workdir)

TIMEOUT = 300
NEEDS = "needs the export extra: pip install --no-deps -r requirements-export.txt"
pytest.importorskip("jax2onnx", reason=NEEDS)
pytest.importorskip("onnxruntime", reason=NEEDS)

# What a user's server runs: onnxruntime and numpy, neither JAX nor our package.
RUNNER = """
import sys
import numpy as np
import onnxruntime
session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
assert [i.name for i in session.get_inputs()] == ["images", "image_whwh"]
batch = np.load(sys.argv[2])
out = session.run(["scores", "labels", "boxes"],
                  {"images": batch["images"], "image_whwh": batch["image_whwh"]})
np.savez(sys.argv[3], **dict(zip(["scores", "labels", "boxes"], out)))
assert not any(m == "jax" or m.startswith(("jax.", "sparse_rcnn_jax")) for m in sys.modules)
"""


def _run_in_fresh_process(model: pathlib.Path, batch: dict, folder: pathlib.Path) -> dict:
  np.savez(folder / "in.npz", images=batch["image"], image_whwh=batch["image_whwh"])
  proc = subprocess.run([sys.executable, "-c", RUNNER, str(model), str(folder / "in.npz"),
                         str(folder / "out.npz")], cwd=folder, env=_env(), capture_output=True,
                        text=True, timeout=TIMEOUT, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return dict(np.load(folder / "out.npz"))


def _photo_batch(data_dir: pathlib.Path, height: int, width: int,
                 sizes: list[tuple[int, int]]) -> dict:
  """COCO val photos resized to (h, w) `sizes`, zero-padded to height x width, as the eval
  pipeline batches them (orig_size = the unpadded size: detections in input pixels)."""
  images = np.zeros((len(sizes), height, width, 3), np.uint8)
  for i, (h, w) in enumerate(sizes):
    images[i, :h, :w] = np.round(photos(data_dir, (h, w), count=i + 1)[i]).astype(np.uint8)
  return {"image": images,
          "image_whwh": np.array([[w, h, w, h] for h, w in sizes], np.float32),
          "orig_size": np.array(sizes, np.int32)}


def _assert_same_detections(got: dict, want: dict, image_whwh: np.ndarray) -> None:
  """Scores to 1e-4, the same labels, boxes to 1e-4 of each image's size (onnxruntime's
  kernels round differently from XLA's, and six head stages carry the difference)."""
  assert got["scores"].dtype == np.float32 and got["labels"].dtype == np.int32
  np.testing.assert_allclose(got["scores"], want["scores"], rtol=0, atol=1e-4)
  np.testing.assert_array_equal(got["labels"], want["labels"])
  scale = image_whwh[:, None, :]
  np.testing.assert_allclose(got["boxes"] / scale, want["boxes"] / scale, rtol=0, atol=1e-4)


def test_the_cli_onnx_model_runs_without_jax_as_the_jitted_model(workdir, data_dir, tmp_path):
  out = tmp_path / "model.onnx"
  proc = _export_cli("--workdir", str(workdir), "--format", "onnx", "--out", str(out))
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "for onnxruntime: images uint8[B,64,96,3] + image_whwh float32[B,4]" in proc.stdout
  record = json.loads(out.with_name("model.onnx.json").read_text())
  assert record["class_names"] == list(INFO.class_names) and record["batch"] == "symbolic"
  assert record["inputs"]["images"]["shape"] == ["B", 64, 96, 3]
  assert record["format"].startswith("ONNX") and "onnxruntime" in record["call"]

  config, _, model, variables, _ = _restore(workdir)
  # Three photos, a batch size the export never saw, two of them padded.
  batch = _photo_batch(data_dir, 64, 96, [(64, 96), (50, 90), (40, 56)])
  got = _run_in_fresh_process(out, batch, tmp_path)
  assert got["scores"].shape == (3, config.model.num_proposals)
  _assert_same_detections(got, _jitted_detections(model, variables, batch), batch["image_whwh"])


def _restore(workdir):
  run = model_state.load_run(workdir)
  return run.config, run.info, run.model, run.variables, run.step


@pytest.mark.parametrize("num_stages", [
    1, pytest.param(None, marks=pytest.mark.slow, id="the recipe's head")])
def test_the_custom_recipe_with_imagenet_weights_converts(data_dir, tmp_path, num_stages):
  """EfficientNet-Lite0 (depthwise convolutions as grouped ONNX Conv) with its ImageNet
  weights, the recipe's head (or its first stage: converting takes time quadratic in the
  program's length) with random weights, at the recipe's test size."""
  config = custom.get_config()
  config.model.num_stages = num_stages or config.model.num_stages
  model = onnx_export.onnx_model(config.model, num_classes=3)
  variables = model_state.with_backbone(_random_variables(model, 64, 64),
                                        model.backbone.pretrained("imagenet"), "imagenet")
  height, width = 256, 352
  blob = onnx_export.export_onnx(model, variables, height, width)
  (tmp_path / "custom.onnx").write_bytes(blob)
  batch = _photo_batch(data_dir, height, width, [(256, 341), (256, 192)])
  got = _run_in_fresh_process(tmp_path / "custom.onnx", batch, tmp_path)
  jitted = detector.build_model(config.model, 3)  # the CPU forms: the same function
  _assert_same_detections(got, _jitted_detections(jitted, variables, batch),
                          batch["image_whwh"])


def test_a_bfloat16_model_is_refused_with_the_fix():
  config = custom.get_config()
  config.model.dtype = "bfloat16"
  with pytest.raises(ValueError, match="--config.model.dtype=float32"):
    onnx_export.onnx_model(config.model, num_classes=3)


def test_a_missing_converter_names_the_install_command(monkeypatch):
  monkeypatch.setitem(sys.modules, "jax2onnx", None)  # import jax2onnx raises ImportError
  with pytest.raises(ImportError, match="requirements-export.txt"):
    onnx_export.export_onnx(None, {}, 64, 64)
