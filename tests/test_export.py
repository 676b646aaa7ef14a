"""The exported detector (serving.py, export.py) run in a fresh process that imports only jax
and numpy, against the jitted predict function: float32 through the command line on a
workdir, bfloat16 with a fixed batch, the JSON beside the artifact, other platforms, and the
errors a user sees."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import tiny
from sparse_rcnn_jax import run_files
from sparse_rcnn_jax import sharding
from sparse_rcnn_jax import xla_cpu
from sparse_rcnn_jax.data import info as info_lib
from sparse_rcnn_jax.evaluation import inference
from sparse_rcnn_jax.evaluation import serving
from sparse_rcnn_jax.model import detector
from sparse_rcnn_jax.training import checkpointing
from sparse_rcnn_jax.training import model_state

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 300
STEP = 7
INFO = info_lib.DatasetInfo(("disc", "ring", "cross"), (3, 5, 9))

# What a user's server runs: jax and numpy, no import of our package.
LOADER = """
import sys
import jax
import numpy as np
exported = jax.export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
for inputs, outputs in zip(sys.argv[2::2], sys.argv[3::2]):
  batch = np.load(inputs)
  out = exported.call(batch["images"], batch["image_whwh"])
  np.savez(outputs, **{name: np.asarray(value) for name, value in out.items()})
assert "sparse_rcnn_jax" not in sys.modules
"""


def _env(xla_flags: str = "") -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", XLA_FLAGS=xla_flags)
  env.pop("PYTHONPATH", None)
  return env


def _export_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(ROOT / "export.py"), *args], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=TIMEOUT, check=False)


def _call_in_fresh_process(artifact: pathlib.Path, batches: list[dict], folder: pathlib.Path,
                           xla_flags: str = "") -> list[dict]:
  """Detections of the artifact on each batch, computed by LOADER in a new process."""
  paths = []
  for i, batch in enumerate(batches):
    np.savez(folder / f"in{i}.npz", images=batch["image"], image_whwh=batch["image_whwh"])
    paths += [str(folder / f"in{i}.npz"), str(folder / f"out{i}.npz")]
  proc = subprocess.run([sys.executable, "-c", LOADER, str(artifact), *paths], cwd=folder,
                        env=_env(xla_flags), capture_output=True, text=True, timeout=TIMEOUT,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return [dict(np.load(folder / f"out{i}.npz")) for i in range(len(batches))]


def _tiny_config(dtype: str = "float32"):
  """configs/tiny.py with one head stage (half the compile time) and a 64 x 96 test size."""
  config = tiny.get_config()
  config.model.update(num_stages=1, dtype=dtype)
  config.data.update(test_scale=64, max_size=96)
  return config


def _random_variables(model: detector.SparseRCNN, height: int, width: int) -> dict:
  """Random weights of the right shapes (nothing compiled for init); proposals of varied
  sizes, so boxes fall on several levels and some leave the image."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, height, width, 3), jnp.uint8), jnp.ones((1, 4)))
  rng = np.random.default_rng(0)
  flat = {k: rng.normal(0, 0.2, s.shape).astype(s.dtype)
          for k, s in traverse_util.flatten_dict(shapes).items()}
  num = model.head.num_proposals
  flat[("params", "head", "proposal_boxes")] = np.concatenate(
      [rng.uniform(0.1, 0.9, (num, 2)), rng.uniform(0.05, 0.9, (num, 2))], 1).astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def _batch(height: int, width: int, sizes: list[tuple[int, int]], seed: int) -> dict:
  """Images of (h, w) `sizes`, zero-padded to height x width, as the eval pipeline batches
  them (orig_size = the unpadded size: detections in input pixels)."""
  rng = np.random.default_rng(seed)
  images = np.zeros((len(sizes), height, width, 3), np.uint8)
  for i, (h, w) in enumerate(sizes):
    images[i, :h, :w] = rng.integers(0, 256, (h, w, 3))
  return {"image": images,
          "image_whwh": np.array([[w, h, w, h] for h, w in sizes], np.float32),
          "orig_size": np.array(sizes, np.int32)}


def _jitted_detections(model, variables, batch: dict) -> dict:
  predict_fn = inference.make_predict_fn(model, sharding.make_mesh(jax.devices()[:1]))
  return jax.device_get(predict_fn(variables, jax.tree.map(jnp.asarray, batch)))


def _assert_same_detections(got: dict, want: dict) -> None:
  """Equal to float32 rounding: scores, then labels exactly, then boxes (pixels)."""
  assert set(got) == {"scores", "labels", "boxes"}
  assert got["scores"].dtype == np.float32 and got["labels"].dtype == np.int32
  assert np.all(np.diff(got["scores"], axis=1) <= 0)
  np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got["labels"], want["labels"])
  np.testing.assert_allclose(got["boxes"], want["boxes"], rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
  """A workdir as train.py leaves it (config, dataset info, a checkpoint of step 7) holding
  the tiny model with random weights; the optimizer state is zeros, which export ignores."""
  work = tmp_path_factory.mktemp("export") / "work"
  config = _tiny_config()
  model = detector.build_model(config.model, INFO.num_classes)
  variables = _random_variables(model, 64, 96)
  mesh = sharding.make_mesh(jax.devices()[:1])
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                       model_state.abstract_state(model, config, mesh))
  state = state.replace(step=np.int32(STEP), params=variables["params"],
                        batch_stats=variables.get("batch_stats", {}))
  run_files.save(work, config, INFO)
  manager = checkpointing.make_manager(work, config.train.keep_checkpoints)
  assert checkpointing.save(manager, STEP, state, {"position": 0})
  manager.wait_until_finished()
  manager.close()
  return work


@pytest.fixture(scope="module")
def exported(workdir) -> tuple[pathlib.Path, subprocess.CompletedProcess]:
  """export.py with the defaults: symbolic batch, the run's padded test size (64 x 96)."""
  out = workdir.parent / "serve" / "model.jaxexport"
  proc = _export_cli("--workdir", str(workdir), "--out", str(out))
  assert proc.returncode == 0, proc.stderr[-4000:]
  return out, proc


def test_the_cli_export_runs_without_the_package_as_the_jitted_model(workdir, exported,
                                                                     tmp_path):
  out, proc = exported
  assert "images uint8[b,64,96,3] + image_whwh float32[b,4]" in proc.stdout
  assert f"Exported step {STEP}" in proc.stdout and str(out) in proc.stdout
  batch = _batch(64, 96, [(64, 96), (50, 90), (30, 40)], seed=1)
  config = run_files.load_config(workdir)
  model = detector.build_model(config.model, INFO.num_classes)
  variables, step = model_state.restore_variables(
      model, config, workdir, sharding.make_mesh(jax.devices()[:1]))
  assert step == STEP
  want = _jitted_detections(model, variables, batch)
  # The batch is symbolic: called with 3 images, a size the export never saw.
  got, = _call_in_fresh_process(out, [batch], tmp_path)
  assert got["scores"].shape == (3, config.model.num_proposals)
  _assert_same_detections(got, want)
  w, h = batch["image_whwh"][:, None, 0:1], batch["image_whwh"][:, None, 1:2]
  assert np.all(got["boxes"] >= 0)
  assert np.all(got["boxes"][..., 0::2] <= w) and np.all(got["boxes"][..., 1::2] <= h)


def test_the_json_beside_the_artifact_names_the_classes_and_the_contract(exported):
  out, _ = exported
  record = json.loads(out.with_name("model.jaxexport.json").read_text())
  assert record["class_names"] == list(INFO.class_names)
  assert record["category_ids"] == list(INFO.category_ids)
  assert (record["batch"], record["height"], record["width"]) == ("symbolic", 64, 96)
  assert record["inputs"]["images"]["shape"] == ["b", 64, 96, 3]
  assert record["inputs"]["images"]["dtype"] == "uint8"
  assert "multiples of 32" in record["inputs"]["images"]["padding"]
  assert record["num_detections"] == 10 and record["outputs"]["boxes"]["shape"] == ["b", 10, 4]
  assert record["model_dtype"] == "float32" and record["platforms"] == ["cpu"]
  assert record["checkpoint"]["step"] == STEP


def test_a_bfloat16_model_exports_with_a_fixed_batch_and_agrees(tmp_path):
  config = _tiny_config("bfloat16")
  model = serving.serving_model(config.model, INFO.num_classes, ["cpu"])
  variables = _random_variables(model, 64, 96)
  exp = serving.export_detector(model, variables, 64, 96, batch=2)
  assert [a.shape for a in exp.in_avals] == [(2, 64, 96, 3), (2, 4)]
  artifact = tmp_path / "bf16.jaxexport"
  artifact.write_bytes(serving.serialize(exp))
  batch = _batch(64, 96, [(64, 96), (50, 70)], seed=3)
  # The artifact carries no compiler options: the caller compiles it as the predict function
  # is compiled (xla_cpu.py), else XLA:CPU's other convolution kernels round bfloat16
  # differently (scores ~3e-4 apart; float32 agrees either way, as above).
  flags = " ".join(f"--{k}={v}" for k, v in (xla_cpu.compiler_options() or {}).items())
  got, = _call_in_fresh_process(artifact, [batch], tmp_path, xla_flags=flags)
  want = _jitted_detections(detector.build_model(config.model, INFO.num_classes), variables,
                            batch)
  _assert_same_detections(got, want)


def test_other_platforms_lower_and_auto_choices_follow_them():
  config = _tiny_config()
  model = serving.serving_model(config.model, INFO.num_classes, ["cpu", "cuda"])
  assert (model.head.roi_align_impl, model.conv_impl) == ("gather", "xla")
  variables = _random_variables(model, 64, 64)
  assert serving.export_detector(model, variables, 64, 64, platforms=["cpu", "cuda"]
                                 ).platforms == ("cpu", "cuda")
  tpu = serving.serving_model(config.model, INFO.num_classes, ["tpu"])
  assert (tpu.head.roi_align_impl, tpu.conv_impl) == ("separable", "xla")
  # On CPUs alone, depthwise convolutions take the sum over taps (XLA:CPU's grouped convolution
  # is much slower).
  assert serving.serving_model(config.model, INFO.num_classes, ["cpu"]).conv_impl == "matmul_grad"
  assert serving.export_detector(tpu, variables, 64, 64, platforms=["tpu"]).platforms == ("tpu",)
  with pytest.raises(ValueError, match="export once per group of platforms"):
    serving.serving_model(config.model, INFO.num_classes, ["cpu", "tpu"])
  config.model.roi_align_impl = "gather"   # one form for all: the same function
  assert serving.serving_model(config.model, INFO.num_classes, ["cpu", "tpu"]
                               ).head.roi_align_impl == "gather"
  with pytest.raises(ValueError, match="a GPU is cuda or rocm"):
    serving.serving_model(config.model, INFO.num_classes, ["gpu"])


def test_a_size_not_a_multiple_of_32_is_explained(workdir, tmp_path):
  model = serving.serving_model(_tiny_config().model, INFO.num_classes, ["cpu"])
  with pytest.raises(ValueError, match="width 100 is not a positive multiple of 32"):
    serving.check_input_shape(model, 64, 100)
  with pytest.raises(ValueError, match="batch size must be positive"):
    serving.check_input_shape(model, 64, 96, batch=0)
  proc = _export_cli("--workdir", str(workdir), "--out", str(tmp_path / "m.jaxexport"),
                     "--height", "100")
  assert proc.returncode != 0 and not (tmp_path / "m.jaxexport").exists()
  assert "height 100 is not a positive multiple of 32" in proc.stderr and "use 128" in proc.stderr
