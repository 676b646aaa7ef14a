"""model.init_from: the merge by path and shape on hand-made trees, its report, a run started
from another run's workdir on data with other classes, official checkpoints for another head,
and the errors a user sees."""
import dataclasses
import json
import logging
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from configs import tiny
from sparse_rcnn_jax import experiment
from sparse_rcnn_jax.convert import checkpoint_io
from sparse_rcnn_jax.model import detector
from sparse_rcnn_jax.model import official
from sparse_rcnn_jax.training import init_from
from sparse_rcnn_jax.training import model_state

SIZE = 64


def test_merge_sorts_every_leaf_into_its_bucket_and_takes_exact_values():
  source = {"params": {"shared": {"kernel": np.arange(6.0).reshape(2, 3)},  # float64
                       "cls": {"kernel": np.full((4, 3), 7.0, np.float32),
                               "bias": np.full((3,), 8.0, np.float32)},
                       "extra": {"w": np.ones(5, np.float32)}},
            "batch_stats": {"norm": {"mean": np.array([1.5, -2.0, 3.25], np.float32)}}}
  target = {"params": {"shared": {"kernel": jnp.zeros((2, 3))},
                       "cls": {"kernel": jnp.full((4, 5), -1.0), "bias": jnp.full((5,), -4.6)},
                       "new": {"w": jnp.full((2,), 9.0)}},
            "batch_stats": {"norm": {"mean": jnp.zeros(3)}}}
  merged, report = init_from.merge(source, target)

  assert set(report.loaded) == {"params/shared/kernel", "batch_stats/norm/mean"}
  assert report.num_values == 6 + 3
  assert report.mismatched == (("params/cls/bias", (3,), (5,)),
                               ("params/cls/kernel", (4, 3), (4, 5)))
  assert report.missing == ("params/new/w",)
  assert report.unused == ("params/extra/w",)
  assert jax.tree.structure(merged) == jax.tree.structure(target)
  # Loaded: the source's values in the target's dtype; the rest: the target's values.
  assert merged["params"]["shared"]["kernel"].dtype == np.float32
  np.testing.assert_array_equal(merged["params"]["shared"]["kernel"],
                                [[0, 1, 2], [3, 4, 5]])
  np.testing.assert_array_equal(merged["batch_stats"]["norm"]["mean"], [1.5, -2.0, 3.25])
  np.testing.assert_array_equal(merged["params"]["cls"]["kernel"], np.full((4, 5), -1.0))
  np.testing.assert_array_equal(merged["params"]["cls"]["bias"], np.full((5,), -4.6, np.float32))
  np.testing.assert_array_equal(merged["params"]["new"]["w"], [9.0, 9.0])


def test_merge_keeps_an_empty_collection_of_the_target():
  merged, report = init_from.merge({"params": {"a": np.ones(2)}},
                                   {"params": {"a": np.zeros(2)}, "batch_stats": {}})
  assert merged["batch_stats"] == {} and report.loaded == ("params/a",)
  assert not report.missing and not report.unused


def _head_tree(num_stages: int, num_classes: int) -> dict:
  """params/head/stage{i}/{class_logits,linear1} and params/fpn/fpn_output{2..5}."""
  head = {f"stage{i}": {"class_logits": {"kernel": np.zeros((32, num_classes)),
                                         "bias": np.zeros(num_classes)},
                        "linear1": {"kernel": np.zeros((32, 64))}} for i in range(num_stages)}
  fpn = {f"fpn_output{level}": {"bias": np.zeros(32)} for level in range(2, 6)}
  return {"params": {"head": head, "fpn": fpn}}


def test_report_lines_group_tensors_by_layer_and_number():
  merged, report = init_from.merge(_head_tree(6, 3), _head_tree(4, 5) | {"batch_stats": {
      "extra": {"mean": np.zeros(1)}}})
  del merged
  report = dataclasses.replace(report, source="runs/a (step 9)",
                               notes=("num_classes 3 -> 5", "num_stages 6 -> 4"))
  assert report.lines() == [
      "model.init_from runs/a (step 9): loaded 8 of 17 tensors (8,320 values)",
      "  its model config differs: num_classes 3 -> 5, num_stages 6 -> 4",
      "  kept at initialization, shape differs (8 tensors):",
      "    params/head/stage{0-3}/class_logits/bias: [3] in the source, [5] here (4 tensors)",
      "    params/head/stage{0-3}/class_logits/kernel: [32, 3] in the source, [32, 5] here"
      " (4 tensors)",
      "  kept at initialization, not in the source (1 tensor):",
      "    batch_stats/extra/mean",
      "  in the source, unused (6 tensors):",
      "    params/head/stage{4,5} (6 tensors)",
  ]


def test_report_lines_stay_few_for_many_groups():
  source = {"params": {"block": {f"layer{i}": {"w": np.zeros(2)} for i in range(30)}}}
  letters = "abcdefghij"
  target = {"params": {a + b: np.zeros(1) for a in letters[:6] for b in letters}}
  _, report = init_from.merge(source, target)
  lines = report.lines()
  assert lines[2:4] == ["    params/aa", "    params/ab"]  # 60 names, none with a number
  assert lines[9:] == ["    params/ah", "    ... and 52 more groups",
                       "  in the source, unused (30 tensors):",
                       "    params/block/layer{0-29} (30 tensors)"]


def test_differences_lists_changed_keys_present_in_both():
  assert init_from.differences({"num_classes": 3, "hidden_dim": 32, "backbone.depth": 50},
                               {"num_classes": 5, "hidden_dim": 32, "backbone.width": 16}
                               ) == ("num_classes 3 -> 5",)


# A run from another run's workdir.

def _coco_folder(root: pathlib.Path, class_names: tuple[str, ...], num_images: int = 4) -> str:
  """A COCO-format folder (annotations/train.json, images/) of SIZE x SIZE images, each with
  one box of each class drawn in the class's own grey."""
  (root / "annotations").mkdir(parents=True)
  (root / "images").mkdir()
  images, annotations = [], []
  for k in range(num_images):
    pixels = np.full((SIZE, SIZE, 3), 30 * k % 200, np.uint8)
    for c in range(len(class_names)):
      x, y = 4 + 10 * c, 6 + 7 * ((k + c) % 4)
      pixels[y:y + 16, x:x + 12] = 80 + 30 * c
      annotations.append({"id": len(annotations) + 1, "image_id": k + 1, "category_id": c + 1,
                          "bbox": [x, y, 12, 16], "area": 192.0, "iscrowd": 0})
    Image.fromarray(pixels).save(root / "images" / f"{k}.jpg", quality=95)
    images.append({"id": k + 1, "file_name": f"{k}.jpg", "height": SIZE, "width": SIZE})
  categories = [{"id": c + 1, "name": n} for c, n in enumerate(class_names)]
  (root / "annotations" / "train.json").write_text(
      json.dumps({"images": images, "annotations": annotations, "categories": categories}))
  return str(root)


def _tiny_config(coco_root: str, num_steps: int):
  """configs/tiny.py with one head stage (less to compile) on SIZE x SIZE images."""
  config = tiny.get_config()
  config.model.num_stages = 1
  config.data.update(coco_root=coco_root, train_scales=(SIZE,), max_size=SIZE,
                     test_scale=SIZE, batch_size=2, eval_batch_size=2)
  config.train.update(num_steps=num_steps, checkpoint_every=num_steps or 1, ema_decay=0.5)
  return config


def test_a_run_starts_from_another_runs_weights_with_new_class_layers(tmp_path, caplog):
  first = _tiny_config(_coco_folder(tmp_path / "three", ("a", "b", "c")), num_steps=2)
  trained = jax.device_get(experiment.train(first, tmp_path / "first"))
  ema = traverse_util.flatten_dict(trained.ema_params)
  assert any(not np.array_equal(v, p) for v, p in
             zip(ema.values(), traverse_util.flatten_dict(trained.params).values()))

  second = _tiny_config(_coco_folder(tmp_path / "five", tuple("vwxyz")), num_steps=0)
  second.model.init_from = str(tmp_path / "first")
  with caplog.at_level(logging.INFO, logger=model_state.__name__):
    state = jax.device_get(experiment.train(second, tmp_path / "second"))

  assert int(state.step) == 0
  params = traverse_util.flatten_dict(state.params)
  assert set(params) == set(ema)
  stages = range(second.model.num_stages)
  class_layers = {("head", f"stage{i}", "class_logits", n) for i in stages
                  for n in ("kernel", "bias")}
  for path in set(params) - class_layers:
    np.testing.assert_array_equal(params[path], ema[path], err_msg="/".join(path))
  # The class layers: the new run's shapes and initialization (bias at the prior probability).
  p = second.model.prior_prob
  for i in stages:
    np.testing.assert_allclose(params[("head", f"stage{i}", "class_logits", "bias")],
                               np.full(5, -math.log((1 - p) / p)), rtol=1e-6)
    assert params[("head", f"stage{i}", "class_logits", "kernel")].shape == (32, 5)
    assert ema[("head", f"stage{i}", "class_logits", "kernel")].shape == (32, 3)
  log = "\n".join(r.getMessage() for r in caplog.records if r.name == model_state.__name__)
  assert f"model.init_from {tmp_path / 'first'} (step 2, its moving average of the weights): " \
      f"loaded {len(params) - 2} of {len(params)} tensors" in log
  assert "its model config differs: num_classes 3 -> 5" in log
  assert "params/head/stage0/class_logits/kernel: [32, 3] in the source, [32, 5] here" in log
  assert "params/head/stage0/class_logits/bias: [3] in the source, [5] here" in log
  assert "not in the source" not in log and "unused" not in log


def test_init_from_errors_name_the_path(tmp_path):
  config = tiny.get_config()
  model = detector.build_model(config.model, 3)

  def init(init_from, workdir=None):
    config.model.init_from = str(init_from)
    model_state.init_variables(model, config, jax.random.PRNGKey(0), workdir)

  with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'nowhere'} does not exist")):
    init(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError,
                     match=re.escape(f"{tmp_path / 'empty' / 'checkpoints'} holds no checkpoint")):
    init(tmp_path / "empty")
  assert not (tmp_path / "empty" / "checkpoints").exists()
  with pytest.raises(ValueError, match="this run's own workdir. Resuming is automatic"):
    init(tmp_path / "empty", workdir=tmp_path / "empty")


# Official checkpoints.

def _tiny_frozen_bn(num_classes: int, num_stages: int):
  """The tiny config with frozen batch norm and `num_stages` stages, its model and the shapes
  of its variables."""
  config = tiny.get_config()
  config.model.num_stages = num_stages
  config.model.backbone.norm = "frozen_bn"
  model = detector.build_model(config.model, num_classes)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, SIZE, SIZE, 3), jnp.uint8), jnp.ones((1, 4)))
  return config, model, shapes


def _official_checkpoint(path: pathlib.Path, num_classes: int, num_stages: int):
  """An official checkpoint (to_official) of a tiny frozen-batch-norm ResNet-18 model with
  random values; returns (its variables, its model)."""
  _, model, shapes = _tiny_frozen_bn(num_classes, num_stages)
  rng = np.random.default_rng(num_classes)
  variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  checkpoint_io.save_state_dict(official.to_official(variables, model.head, 18), path)
  return variables, model


def _target(num_classes: int, num_stages: int):
  """A tiny frozen-batch-norm config, its model and, as its initial variables, zeros (unlike
  every value of a checkpoint of _official_checkpoint)."""
  config, model, shapes = _tiny_frozen_bn(num_classes, num_stages)
  return config, model, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


@pytest.mark.parametrize("suffix", [".npz", ".pth"])
def test_an_official_checkpoint_of_the_same_architecture_loads_every_tensor(suffix, tmp_path):
  if suffix == ".pth":
    pytest.importorskip("torch")
  path = tmp_path / f"model{suffix}"
  source, _ = _official_checkpoint(path, num_classes=3, num_stages=2)
  config, model, zeros = _target(3, 2)
  merged, report = model_state.load_init_from(path, model, config, zeros)
  ours, theirs = traverse_util.flatten_dict(merged), traverse_util.flatten_dict(source)
  assert set(ours) == set(theirs) and len(report.loaded) == len(theirs)
  for path, value in theirs.items():
    np.testing.assert_array_equal(ours[path], value, err_msg="/".join(path))
  assert not report.mismatched and not report.missing and not report.unused and not report.notes
  assert report.lines()[1:] == []


def test_an_official_checkpoint_for_another_head_loads_what_fits(tmp_path):
  source, source_model = _official_checkpoint(tmp_path / "model.npz", num_classes=3,
                                              num_stages=2)
  state = checkpoint_io.load_state_dict(tmp_path / "model.npz")
  config, model, zeros = _target(5, 1)
  assert official.architecture_of(state, model.head) == (source_model.head, 18)
  merged, report = model_state.load_init_from(tmp_path / "model.npz", model, config, zeros)

  theirs = traverse_util.flatten_dict(source, sep="/")
  ours = traverse_util.flatten_dict(merged, sep="/")
  class_layer = ("params/head/stage0/class_logits/bias", "params/head/stage0/class_logits/kernel")
  assert report.mismatched == ((class_layer[0], (3,), (5,)), (class_layer[1], (32, 3), (32, 5)))
  assert set(report.unused) == {p for p in theirs if p.startswith("params/head/stage1/")}
  assert not report.missing
  assert set(report.loaded) == set(ours) - set(class_layer)
  assert any(p.startswith("batch_stats/backbone/") for p in report.loaded)
  for path in report.loaded:
    np.testing.assert_array_equal(ours[path], theirs[path], err_msg=path)
  for path in class_layer:
    assert not ours[path].any()
  assert report.notes == ("num_classes 3 -> 5", "num_stages 2 -> 1")
  assert report.source == f"{tmp_path / 'model.npz'} (an official checkpoint)"
