"""The predict function against the model and postprocess called directly; COCO results of a
dataset pass against a NumPy loop, empty slots and dropped boxes left out."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import tiny
from sparse_rcnn_jax import sharding
from sparse_rcnn_jax.evaluation import inference
from sparse_rcnn_jax.evaluation import postprocess
from sparse_rcnn_jax.model import detector

HEIGHT, WIDTH = 64, 64


@pytest.fixture(scope="module")
def setup():
  """A one-stage tiny detector with random weights (shapes from eval_shape: nothing compiled
  for init), its predict function, and a batch of two images of different sizes."""
  config = tiny.get_config()
  config.model.num_stages = 1
  model = detector.build_model(config.model)
  rng = np.random.default_rng(0)
  images = np.zeros((2, HEIGHT, WIDTH, 3), np.uint8)
  images[0] = rng.integers(0, 256, (HEIGHT, WIDTH, 3))
  images[1, :40, :50] = rng.integers(0, 256, (40, 50, 3))
  batch = {"image": images,
           "image_whwh": np.array([[64, 64, 64, 64], [50, 40, 50, 40]], np.float32),
           "orig_size": np.array([[480, 720], [100, 140]], np.int32),   # (h, w)
           "image_id": np.array([11, 12], np.int64),
           "valid": np.array([True, True])}
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.asarray(images),
                          jnp.asarray(batch["image_whwh"]))
  flat = {k: rng.normal(0, 0.2, s.shape).astype(s.dtype)
          for k, s in traverse_util.flatten_dict(shapes).items()}
  num = config.model.num_proposals
  flat[("params", "head", "proposal_boxes")] = np.concatenate(
      [rng.uniform(0.2, 0.8, (num, 2)), rng.uniform(0.1, 0.6, (num, 2))], 1).astype(np.float32)
  flat[("params", "head", "proposal_boxes")][:3, 0] = -2.0    # far left: empty after clipping
  variables = jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat))
  mesh = sharding.make_mesh()
  predict_fn = inference.make_predict_fn(model, mesh)
  dets = jax.tree.map(np.asarray, predict_fn(variables, jax.tree.map(jnp.asarray, batch)))
  out = jax.tree.map(np.asarray, jax.jit(model.apply)(variables, jnp.asarray(images),
                                                      jnp.asarray(batch["image_whwh"])))
  return {"model": model, "variables": variables, "mesh": mesh, "predict_fn": predict_fn,
          "batch": batch, "dets": dets, "out": out, "config": config}


def test_detections_equal_apply_then_postprocess(setup):
  out, batch, dets = setup["out"], setup["batch"], setup["dets"]
  want = jax.tree.map(np.asarray, postprocess.postprocess(
      jnp.asarray(out["pred_logits"][-1]), jnp.asarray(out["pred_boxes"][-1]),
      jnp.asarray(batch["image_whwh"]), jnp.asarray(batch["orig_size"])))
  assert set(want) <= set(dets)
  num = setup["config"].model.num_proposals
  assert dets["scores"].shape == (2, num)
  np.testing.assert_array_equal(dets["labels"], want["labels"])
  np.testing.assert_array_equal(dets["proposal_index"], want["proposal_index"])
  np.testing.assert_array_equal(dets["valid"], want["valid"])
  np.testing.assert_allclose(dets["scores"], want["scores"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dets["boxes"], want["boxes"], rtol=1e-4, atol=1e-3)


def test_stage_boxes_and_scores(setup):
  out, batch, dets = setup["out"], setup["batch"], setup["dets"]
  stages, _, num, _ = out["pred_boxes"].shape
  assert dets["stage_boxes"].shape == (2, stages + 1, num, 4)
  assert dets["stage_scores"].shape == (2, stages, num)
  for b in range(2):
    h, w = batch["orig_size"][b]
    scale = np.array([w / batch["image_whwh"][b, 0], h / batch["image_whwh"][b, 1]] * 2)
    np.testing.assert_allclose(dets["stage_boxes"][b, 0], out["proposal_boxes"][b] * scale,
                               rtol=1e-5, atol=1e-3)
    for s in range(stages):
      np.testing.assert_allclose(dets["stage_boxes"][b, s + 1], out["pred_boxes"][s, b] * scale,
                                 rtol=1e-4, atol=1e-3)
      probs = 1 / (1 + np.exp(-out["pred_logits"][s, b].astype(np.float64)))
      np.testing.assert_allclose(dets["stage_scores"][b, s], probs.max(-1), rtol=1e-5)
  # The last stage's boxes of the chosen proposals, clipped, are the detections' boxes.
  for b in range(2):
    h, w = batch["orig_size"][b]
    chosen = dets["stage_boxes"][b, -1][dets["proposal_index"][b]]
    np.testing.assert_allclose(np.clip(chosen, 0, [w, h, w, h]), dets["boxes"][b], rtol=1e-5,
                               atol=1e-3)


def np_coco_results(dets, image_ids, slot_valid, category_ids):
  """The COCO results a pass should give: one loop over images and detections."""
  results = []
  for b in range(len(image_ids)):
    if not slot_valid[b]:
      continue
    for j in range(dets["scores"].shape[1]):
      if not dets["valid"][b, j]:
        continue
      x1, y1, x2, y2 = dets["boxes"][b, j].astype(np.float64)
      results.append({"image_id": int(image_ids[b]),
                      "category_id": int(category_ids[dets["labels"][b, j]]),
                      "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                      "score": float(dets["scores"][b, j])})
  return results


def test_predict_dataset_skips_empty_slots_and_dropped_boxes(setup):
  batch = setup["batch"]
  # A second batch whose last slot is empty, as the eval iterator completes its last batch:
  # zero image, sizes equal to the bucket, image id -1, valid False.
  last = {k: v.copy() for k, v in batch.items()}
  last["image"][1] = 0
  last["image_whwh"][1] = (WIDTH, HEIGHT, WIDTH, HEIGHT)
  last["orig_size"][1] = (HEIGHT, WIDTH)
  last["image_id"] = np.array([13, -1], np.int64)
  last["valid"] = np.array([True, False])
  num_classes = setup["config"].model.num_classes
  category_ids = list(range(100, 100 + 3 * num_classes, 3))     # gaps, as COCO's ids have
  results = inference.predict_dataset(setup["predict_fn"], setup["variables"], [batch, last],
                                      setup["mesh"], category_ids)
  want = []
  for b in (batch, last):
    dets = jax.tree.map(np.asarray, setup["predict_fn"](setup["variables"],
                                                         jax.tree.map(jnp.asarray, b)))
    want += np_coco_results(dets, b["image_id"], b["valid"], category_ids)
  assert [r["image_id"] for r in results] == [r["image_id"] for r in want]
  assert {r["image_id"] for r in results} == {11, 12, 13}
  # Three real images of k detections each, some emptied by clipping.
  assert 0 < len(results) < 3 * setup["config"].model.num_proposals
  assert len(results) == len(want)
  for got, expected in zip(results, want):
    assert got["category_id"] == expected["category_id"]
    np.testing.assert_allclose(got["bbox"], expected["bbox"], atol=0.011)
    np.testing.assert_allclose(got["score"], expected["score"], rtol=1e-6)
