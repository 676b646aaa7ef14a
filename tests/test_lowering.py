"""Every program lowers for GPU (cuda) and TPU on this CPU machine, in the forms chosen for
those platforms (serving.serving_model: XLA's convolutions, the separable RoIAlign on TPU):
the exported inference in float32 and bfloat16, and the training step with the device
matcher, whose lowered program holds no host callback. The CPU-only compiler options
(xla_cpu.py) are given to no program off the CPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from sparse_rcnn_jax import sharding
from sparse_rcnn_jax import xla_cpu
from sparse_rcnn_jax.evaluation import serving
from sparse_rcnn_jax.training import model_state
from sparse_rcnn_jax.training import trainer

PLATFORMS = ("cuda", "tpu")
NUM_CLASSES = 3


def _config(dtype: str = "float32", matcher: str = "device"):
  config = tiny.get_config()
  config.model.update(dtype=dtype, num_stages=2)
  config.loss.matcher = matcher
  config.data.update(batch_size=2, max_boxes=4)
  return config


def _variables(model, side: int = 64) -> dict:
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, side, side, 3), jnp.uint8), jnp.ones((1, 4)))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _host_callbacks(text: str) -> int:
  """Host callbacks in a lowered module: pure_callback's custom calls on any platform."""
  return text.count("callback")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_exported_inference_lowers(platform, dtype):
  model = serving.serving_model(_config(dtype).model, NUM_CLASSES, [platform])
  assert model.conv_impl == "xla"
  assert model.head.roi_align_impl == ("separable" if platform == "tpu" else "gather")
  exported = serving.export_detector(model, _variables(model), 64, 96, platforms=[platform])
  assert exported.platforms == (platform,)
  text = exported.mlir_module()
  assert _host_callbacks(text) == 0
  assert ("bf16" in text) == (dtype == "bfloat16")


def _lowered_train_step(platform: str, matcher: str, dtype: str = "float32") -> str:
  config = _config(dtype, matcher)
  model = serving.serving_model(config.model, NUM_CLASSES, [platform])
  mesh = sharding.make_mesh(jax.devices()[:1])
  state = model_state.abstract_state(model, config, mesh)
  b, n = config.data.batch_size, config.data.max_boxes
  batch = {"image": jax.ShapeDtypeStruct((b, 64, 96, 3), jnp.uint8),
           "image_whwh": jax.ShapeDtypeStruct((b, 4), jnp.float32),
           "gt_boxes": jax.ShapeDtypeStruct((b, n, 4), jnp.float32),
           "gt_labels": jax.ShapeDtypeStruct((b, n), jnp.int32),
           "gt_mask": jax.ShapeDtypeStruct((b, n), jnp.bool_)}
  step = trainer.make_train_step(model, config, mesh, state)
  return step.trace(state, batch).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_train_step_with_the_device_matcher_lowers_without_host_callbacks(platform):
  assert _host_callbacks(_lowered_train_step(platform, "device")) == 0


def test_the_scipy_matchers_step_holds_its_host_callback():
  """What the check above looks for is there when the matcher runs on the host (lowered for
  this machine's CPU: JAX lowers a host callback only for the backend it runs on)."""
  assert _host_callbacks(_lowered_train_step("cpu", "scipy")) > 0


def test_bfloat16_train_step_lowers_for_tpu():
  assert "bf16" in _lowered_train_step("tpu", "device", "bfloat16")


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_no_cpu_compiler_option_off_the_cpu(monkeypatch, backend):
  assert xla_cpu.compiler_options() is not None or jax.default_backend() != "cpu"
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  assert xla_cpu.compiler_options() is None
