"""Early exit (model.eval_stages) and per-stage evaluation: inference that stops after stage k
gives exactly stage k's predictions of the whole head; training and initialization run every
stage; the per-stage predict function's stage k equals the early-exit model's detections."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import tiny
from sparse_rcnn_jax import sharding
from sparse_rcnn_jax.evaluation import inference
from sparse_rcnn_jax.model import detector

STAGES = 3


def _config(eval_stages: int = 0):
  config = tiny.get_config()
  config.model.update(num_stages=STAGES, eval_stages=eval_stages)
  return config


@pytest.fixture(scope="module")
def setup():
  """Random weights of the 3-stage tiny detector and a batch of two images."""
  model = detector.build_model(_config().model)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 64, 96, 3)).astype(np.uint8)
  whwh = np.array([[96, 64, 96, 64], [80, 50, 80, 50]], np.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, whwh)
  variables = traverse_util.unflatten_dict(
      {k: rng.normal(0, 0.2, s.shape).astype(s.dtype)
       for k, s in traverse_util.flatten_dict(shapes).items()})
  batch = {"image": images, "image_whwh": whwh, "orig_size": np.array([[64, 96], [50, 80]])}
  full = jax.jit(model.apply)(variables, images, whwh)
  return variables, batch, jax.tree.map(np.asarray, full)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_early_exit_gives_the_first_stages_of_the_whole_head(setup, k):
  variables, batch, full = setup
  model = detector.build_model(_config(k).model)
  out = jax.jit(model.apply)(variables, batch["image"], batch["image_whwh"])
  assert out["pred_logits"].shape[0] == k
  np.testing.assert_allclose(out["pred_logits"], full["pred_logits"][:k], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out["pred_boxes"], full["pred_boxes"][:k], rtol=1e-6, atol=1e-4)


def test_training_and_initialization_run_every_stage(setup):
  variables, batch, _ = setup
  model = detector.build_model(_config(1).model)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch["image"],
                          batch["image_whwh"])
  assert jax.tree.map(np.shape, shapes) == jax.tree.map(np.shape, variables)
  out = jax.eval_shape(lambda v: model.apply(v, batch["image"], batch["image_whwh"],
                                             deterministic=False), variables)
  assert out["pred_logits"].shape[0] == STAGES


def test_a_stage_count_beyond_the_head_is_refused():
  with pytest.raises(ValueError, match=r"eval_stages=4: choose 1\.\.3"):
    detector.build_model(_config(4).model)


def test_each_stage_of_the_stages_predict_fn_is_that_early_exit(setup):
  variables, batch, _ = setup
  mesh = sharding.make_mesh(jax.devices()[:1])
  batch = jax.tree.map(jnp.asarray, batch)
  per_stage = jax.device_get(inference.make_stages_predict_fn(
      detector.build_model(_config().model), mesh)(variables, batch))
  assert per_stage["scores"].shape[:2] == (2, STAGES)
  for k in range(1, STAGES + 1):
    model = detector.build_model(_config(k).model)
    want = jax.device_get(inference.make_predict_fn(model, mesh)(variables, batch))
    np.testing.assert_array_equal(per_stage["labels"][:, k - 1], want["labels"])
    np.testing.assert_allclose(per_stage["scores"][:, k - 1], want["scores"], rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(per_stage["boxes"][:, k - 1], want["boxes"], rtol=1e-6,
                               atol=1e-4)


def test_both_exports_stop_where_the_config_says(setup):
  """The jax.export artifact of a model with eval_stages=2 gives stage 2's detections of the
  whole head; the ONNX model is built with the same early exit."""
  from sparse_rcnn_jax.evaluation import onnx_export  # pylint: disable=g-import-not-at-top
  from sparse_rcnn_jax.evaluation import serving  # pylint: disable=g-import-not-at-top
  variables, batch, _ = setup
  config = _config(2)
  model = serving.serving_model(config.model, config.model.num_classes, ["cpu"])
  assert model.eval_stages == 2
  assert onnx_export.onnx_model(config.model, config.model.num_classes).eval_stages == 2
  exported = serving.export_detector(model, variables, 64, 96)
  got = jax.device_get(exported.call(batch["image"], batch["image_whwh"]))
  # The artifact's boxes stay in input pixels: the full model's stage 2 with orig = input size.
  mesh = sharding.make_mesh(jax.devices()[:1])
  full = dict(batch, orig_size=batch["image_whwh"][:, 1::-1].astype(np.int32))
  want = jax.device_get(inference.make_stages_predict_fn(
      detector.build_model(_config().model), mesh)(variables, jax.tree.map(jnp.asarray, full)))
  np.testing.assert_array_equal(got["labels"], want["labels"][:, 1])
  np.testing.assert_allclose(got["scores"], want["scores"][:, 1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["boxes"], want["boxes"][:, 1], rtol=1e-5, atol=1e-3)
