"""The loader end to end: batch contract, determinism, resuming, hosts, eval coverage, bad files."""
import ast
import json
import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from sparse_rcnn_jax import device_batches
from sparse_rcnn_jax.data import coco
from sparse_rcnn_jax.data import config as data_config
from sparse_rcnn_jax.data import pipeline
from sparse_rcnn_jax.data import source as source_lib
from sparse_rcnn_jax.data import transforms

ROOT = pathlib.Path(__file__).resolve().parents[1]
from test_data_coco import make_coco_folder  # pylint: disable=g-bad-import-order

# 7 landscape and 4 portrait images, one box each (drawn white by make_coco_folder).
SIZES = ((48, 64), (64, 48), (40, 72), (48, 64), (64, 40), (44, 60), (60, 44), (48, 64),
         (40, 56), (36, 64), (48, 56))


@pytest.fixture(name="folder")
def fixture_folder(tmp_path):
  annotations = [{"id": k + 1, "image_id": k + 1, "category_id": 3 + 4 * (k % 2),
                  "bbox": [4 + k, 6, 14 + k, 12 + k]} for k in range(len(SIZES))]
  return make_coco_folder(tmp_path, sizes=SIZES, annotations=annotations,
                          categories=((3, "cat"), (7, "dog")))


def tiny_config(ann_path, image_dir, **overrides):
  config = data_config.default_config()
  config.update({"train_ann": ann_path, "train_images": image_dir, "eval_ann": ann_path,
                 "eval_images": image_dir, "train_scales": (32, 48, 64), "max_size": 96,
                 "test_scale": 48, "batch_size": 4, "eval_batch_size": 4, "num_workers": 0,
                 "read_threads": 2, **overrides})
  return config


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_default_config_and_batch_shapes():
  config = data_config.default_config()
  assert config.train_scales == tuple(range(480, 801, 32)) and config.max_size == 1333
  assert config.on_bad_image == "skip" and config.on_bad_annotation == "error"
  assert pipeline.batch_shapes(config, size_divisibility=32) == [(800, 1344), (1344, 800), (1344, 1344)]
  config.test_scale = 600
  assert pipeline.batch_shapes(config, "eval", size_divisibility=32) == [(608, 1344), (1344, 608), (1344, 1344)]
  config.buckets = ((64, 96), (96, 64))
  assert pipeline.batch_shapes(config, "eval", size_divisibility=32) == [(64, 96), (96, 64)]
  config.buckets = ((64, 100),)
  with pytest.raises(ValueError, match="multiples of 32"):
    pipeline.batch_shapes(config, size_divisibility=32)


def _bright_box(image):
  ys, xs = np.nonzero(image[..., 0] > 180)
  return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("crop", [False, True])
def test_train_batches_follow_the_contract(folder, crop):
  config = tiny_config(*folder, crop=crop, crop_scales=(40, 56), crop_size=(24, 40))
  source = pipeline.load_source(config, "train")
  batches = take(pipeline.train_iterator(config, source, size_divisibility=32), 6)
  plan = pipeline.TrainPlan(pipeline.Planner(source, config, "train", 4, 0, 1, size_divisibility=32), config.seed)
  shapes = pipeline.batch_shapes(config, size_divisibility=32)
  for step, batch in enumerate(batches):
    assert batch["image"].dtype == np.uint8 and batch["image"].shape[0] == 4
    assert tuple(batch["image"].shape[1:3]) in shapes
    assert batch["image"].shape[1:3] == plan[step].min_shape  # The bucket was planned.
    assert batch["gt_boxes"].shape == (4, 100, 4) and batch["valid"].all()
    for i in range(4):
      w, h = batch["image_whwh"][i, :2].astype(int)
      image = batch["image"][i]
      assert image[h:].max(initial=0) == 0 and image[:, w:].max(initial=0) == 0
      assert min(h, w) in config.train_scales or max(h, w) == config.max_size
      k = batch["image_id"][i] - 1
      assert tuple(batch["orig_size"][i]) == SIZES[k]
      planned = transforms.sample_params(*SIZES[k], plan[step].uniforms[i],
                                                  pipeline.augment_config(config, "train"))
      assert (planned.out_h, planned.out_w) == (h, w)
      if batch["gt_mask"][i].any():
        assert batch["gt_mask"][i].sum() == 1 and batch["gt_labels"][i, 0] == k % 2
        # The box still bounds its white rectangle after flip, crop and resize.
        np.testing.assert_allclose(batch["gt_boxes"][i, 0], _bright_box(image), atol=1.5)
      else:
        assert crop and image[..., 0].max() < 180  # Cropped away with its rectangle.


def test_training_is_deterministic_grouped_and_covers_each_epoch(folder):
  config = tiny_config(*folder)
  source = pipeline.load_source(config, "train")
  first = take(pipeline.train_iterator(config, source, size_divisibility=32), 4)
  assert_same_batches(first, take(pipeline.train_iterator(config, source, size_divisibility=32), 4))
  config.seed = 1
  other = take(pipeline.train_iterator(config, source, size_divisibility=32), 4)
  assert any((a["image_id"] != b["image_id"]).any() for a, b in zip(first, other))
  for epoch in (first[:2], first[2:]):  # 11 images, batch 4: 2 batches per epoch.
    ids = np.concatenate([b["image_id"] for b in epoch])
    assert len(set(ids)) == 8
  grouped = _mixed_orientation_batches(source, config, epochs=20)
  assert grouped <= 20  # At most the one batch of leftovers per epoch.
  config.group_by_aspect = False
  # Ungrouped, most of the 40 batches mix orientations (a batch of 4 of these 11 images is
  # all-landscape with probability 70 / 330).
  assert _mixed_orientation_batches(source, config, epochs=20) > max(grouped, 25)


def _mixed_orientation_batches(source, config, epochs):
  """How many planned training batches mix landscape and portrait output images."""
  plan = pipeline.TrainPlan(pipeline.Planner(source, config, "train", 4, 0, 1, size_divisibility=32), seed=0)
  augment = pipeline.augment_config(config, "train")
  mixed = 0
  for epoch in range(epochs):
    batches, uniforms, _ = plan.epoch(epoch)
    for batch in batches:
      portrait = {bool(p.out_h > p.out_w) for p in (
          transforms.sample_params(*source.image_sizes[i], uniforms[i], augment)
          for i in batch)}
      mixed += len(portrait) > 1
  return mixed


def test_resuming_from_state_continues_with_the_same_batches(folder):
  config = tiny_config(*folder)
  source = pipeline.load_source(config, "train")
  iterator = pipeline.train_iterator(config, source, size_divisibility=32)
  take(iterator, 3)
  state = iterator.get_state()
  expected = take(iterator, 3)
  resumed = pipeline.train_iterator(config, source, size_divisibility=32)
  resumed.set_state(state)
  assert_same_batches(expected, take(resumed, 3))


def test_hosts_read_disjoint_slots_of_one_global_batch(folder):
  config = tiny_config(*folder)
  source = pipeline.load_source(config, "train")
  single = take(pipeline.train_iterator(config, source, size_divisibility=32), 4)
  hosts = [take(pipeline.train_iterator(config, source, p, 2, size_divisibility=32), 4) for p in range(2)]
  for step, batch in enumerate(single):
    parts = [h[step] for h in hosts]
    assert all(p["image"].shape[1:] == batch["image"].shape[1:] for p in parts)  # Same bucket.
    np.testing.assert_array_equal(np.concatenate([p["image_id"] for p in parts]),
                                  batch["image_id"])


def test_eval_reads_every_image_once_across_hosts(folder):
  config = tiny_config(*folder)
  source = pipeline.load_source(config, "eval")
  raw = json.loads(pathlib.Path(folder[0]).read_text())
  boxes = {a["image_id"]: a["bbox"] for a in raw["annotations"]}
  per_host = [list(pipeline.eval_iterator(config, source, p, 2, size_divisibility=32)) for p in range(2)]
  assert len(per_host[0]) == len(per_host[1]) == 3  # ceil(11 / 4) global batches.
  seen = []
  for batch in (b for host in per_host for b in host):
    assert batch["image"].shape[0] == 2
    for i in np.nonzero(batch["valid"])[0]:
      image_id = batch["image_id"][i]
      seen.append(image_id)
      h, w = batch["orig_size"][i]
      new_w, new_h = batch["image_whwh"][i, :2]
      assert min(new_h, new_w) == 48 or max(new_h, new_w) == 96
      x, y, bw, bh = boxes[image_id]
      np.testing.assert_allclose(batch["gt_boxes"][i, 0],
                                 [x * new_w / w, y * new_h / h, (x + bw) * new_w / w,
                                  (y + bh) * new_h / h], rtol=1e-5)
    assert (batch["image_id"][~batch["valid"]] == -1).all()
  assert sorted(seen) == list(range(1, 12))


def test_undecodable_images_leave_an_empty_slot_or_fail_by_policy(folder):
  ann_path, image_dir = folder
  pathlib.Path(image_dir, "0003.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
  # Without the check before training, the image is found bad only when decoded.
  config = tiny_config(ann_path, image_dir, eval_batch_size=11, check="off")
  source = pipeline.load_source(config, "eval")
  assert len(source) == 11
  (batch,) = list(pipeline.eval_iterator(config, source, size_divisibility=32))
  assert batch["valid"].sum() == 10 and 3 not in batch["image_id"]
  empty = np.nonzero(~batch["valid"])[0][0]
  assert batch["image"][empty].max() == 0 and not batch["gt_mask"][empty].any()
  assert batch["skipped"].tolist() == [2 if i == empty else -1 for i in range(11)]
  config.on_bad_image = "error"
  with pytest.raises(source_lib.BadImageError, match="0003.jpg"):
    list(pipeline.eval_iterator(config, source, size_divisibility=32))
  # With it (the default), the file is left out before the first batch, or stops the run.
  config.check = "headers"
  with pytest.raises(source_lib.DataError, match=r"(?s)1 x unreadable header.*0003\.jpg"):
    pipeline.load_source(config, "eval")
  config.on_bad_image = "skip"
  assert 3 not in pipeline.load_source(config, "eval").table.image_ids


def _host_keys_dropped(batch):
  return {k: v for k, v in batch.items() if k not in pipeline.HOST_KEYS}


def test_a_bad_image_mid_run_changes_nothing_else_and_resume_stays_exact(folder):
  """Nothing lost: an image failing to decode under "skip" empties its own slot; every other
  slot holds what a run with the image intact holds, and resuming is exact with skips."""
  ann_path, image_dir = folder
  config = tiny_config(ann_path, image_dir, check="off")
  source = pipeline.load_source(config, "train")
  intact = take(pipeline.train_iterator(config, source, size_divisibility=32), 9)  # 11 images, 2 per epoch: 4+ epochs
  pathlib.Path(image_dir, "0005.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
  damaged = take(pipeline.train_iterator(config, source, size_divisibility=32), 9)
  bad_draws = 0
  for good, bad in zip(intact, damaged):
    lost = (good["image_id"] == 5)
    bad_draws += lost.sum()
    np.testing.assert_array_equal(bad["valid"], good["valid"] & ~lost)
    np.testing.assert_array_equal(bad["skipped"], np.where(lost, 4, -1))
    for key in ("image", "gt_boxes", "gt_labels", "gt_mask", "image_whwh", "orig_size"):
      np.testing.assert_array_equal(bad[key][~lost], good[key][~lost], err_msg=key)
    np.testing.assert_array_equal(bad["image_id"], np.where(lost, -1, good["image_id"]))
  assert bad_draws >= 2  # Image 5 was drawn (twice or more) in these epochs.
  iterator = pipeline.train_iterator(config, source, size_divisibility=32)
  take(iterator, 4)
  resumed = pipeline.train_iterator(config, source, size_divisibility=32)
  resumed.set_state(iterator.get_state())
  assert_same_batches(damaged[4:], take(resumed, 5))


def test_skipped_images_are_summarized_once_per_epoch(folder, caplog):
  ann_path, image_dir = folder
  config = tiny_config(ann_path, image_dir, check="off")
  source = pipeline.load_source(config, "train")
  pathlib.Path(image_dir, "0005.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
  report = pipeline.SkipReport(source, "train")
  batches = pipeline.train_iterator(config, source, size_divisibility=32)
  with caplog.at_level(logging.WARNING):
    for _ in range(3 * 2 + 1):  # Three whole epochs of 2 batches, and one batch of the fourth.
      report.add(next(batches))
    report.close()
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  per_draw = [w for w in warnings if "0005.jpg: cannot decode" in w]
  summaries = [w for w in warnings if "left empty" in w]
  assert len(per_draw) == 1  # The reason once, not once per draw.
  epochs = [int(w.split("epoch ")[1].split(":")[0]) for w in summaries]
  assert epochs == sorted(set(epochs)) and len(epochs) >= 2
  assert all("0005.jpg" in w and "1 images" in w for w in summaries)
  assert report.total == sum(int(w.split(": ")[1].split(" draws")[0]) for w in summaries)


def test_images_with_more_boxes_than_slots_are_refused_up_front(folder):
  config = tiny_config(*folder, max_boxes=0)
  with pytest.raises(ValueError, match="raise max_boxes"):
    pipeline.train_iterator(config, pipeline.load_source(config, "train"), size_divisibility=32)


def test_a_training_set_smaller_than_a_batch_is_refused(folder):
  config = tiny_config(*folder, batch_size=12)
  with pytest.raises(ValueError, match="11 images, fewer than the global batch size 12"):
    pipeline.train_iterator(config, pipeline.load_source(config, "train"), size_divisibility=32)


def test_two_worker_processes_give_the_same_batches_and_state(folder):
  config = tiny_config(*folder)
  source = pipeline.load_source(config, "train")
  expected = take(pipeline.train_iterator(config, source, size_divisibility=32), 5)
  config.num_workers = 2
  iterator = pipeline.train_iterator(config, source, size_divisibility=32)
  assert_same_batches(expected[:3], take(iterator, 3))
  state = iterator.get_state()
  resumed = pipeline.train_iterator(config, source, size_divisibility=32)
  resumed.set_state(state)
  assert_same_batches(expected[3:], take(resumed, 2))
  iterator.close()
  resumed.close()


def test_device_prefetch_checkpoints_the_batches_handed_out(folder):
  config = tiny_config(*folder)
  source = pipeline.load_source(config, "train")
  expected = take(pipeline.train_iterator(config, source, size_divisibility=32), 5)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  prefetch = device_batches.DevicePrefetch(
      pipeline.train_iterator(config, source, size_divisibility=32), mesh, size=2)
  got = take(prefetch, 2)
  assert isinstance(got[0]["image"], jax.Array)
  expected = [_host_keys_dropped(b) for b in expected]
  assert_same_batches(expected[:2], [jax.device_get(b) for b in got])
  state = prefetch.get_state()
  resumed = device_batches.DevicePrefetch(pipeline.train_iterator(config, source, size_divisibility=32), mesh)
  resumed.set_state(state)
  assert_same_batches(expected[2:], [jax.device_get(b) for b in take(resumed, 3)])


def test_eval_device_prefetch_stops(folder):
  config = tiny_config(*folder)
  source = pipeline.load_source(config, "eval")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  assert len(list(device_batches.DevicePrefetch(pipeline.eval_iterator(config, source, size_divisibility=32), mesh))) == 3


def test_global_batch_is_sharded_along_data_on_8_devices():
  script = textwrap.dedent("""
      import jax, numpy as np
      from sparse_rcnn_jax import device_batches
      mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
      batch = {"image": np.arange(8 * 4 * 6 * 3, dtype=np.uint8).reshape(8, 4, 6, 3),
               "valid": np.arange(8) % 3 > 0}
      out = device_batches.make_global_batch(batch, mesh)
      assert out["image"].shape == (8, 4, 6, 3) and out["valid"].dtype == bool
      for shard in out["image"].addressable_shards:
        rows = shard.index[0]
        assert shard.data.shape[0] == 2, shard.data.shape
        np.testing.assert_array_equal(np.asarray(shard.data), batch["image"][rows])
      np.testing.assert_array_equal(np.asarray(out["valid"]), batch["valid"])
      print("ok", len(out["image"].sharding.device_set))
  """)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([str(pathlib.Path(__file__).parents[1]),
                                        os.environ.get("PYTHONPATH", "")])}
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == "ok 8"


def test_coco128_eval_pass(data_dir):
  root = data_dir / "coco128"
  config = data_config.default_config()
  config.update(eval_ann=str(root / "annotations" / "instances_train2017.json"),
                eval_images=str(root / "train2017"), test_scale=64, max_size=96,
                eval_batch_size=24, num_workers=0)
  source = pipeline.load_source(config, "eval")
  assert isinstance(source, coco.CocoSource)
  ids, boxes = [], 0
  for batch in pipeline.eval_iterator(config, source, size_divisibility=32):
    assert tuple(batch["image"].shape[1:3]) in pipeline.batch_shapes(config, "eval", size_divisibility=32)
    ids.extend(batch["image_id"][batch["valid"]])
    boxes += batch["gt_mask"].sum()
  assert sorted(ids) == sorted(source.table.image_ids.tolist())
  assert boxes == source.num_boxes.sum() == 929  # Crowd boxes stay out of batches.


def test_bccd_train_batches(data_dir):
  root = data_dir / "bccd"
  config = data_config.default_config()
  config.update(train_ann=str(root / "instances_trainval.json"),
                train_images=str(root / "JPEGImages"), train_scales=(96, 128), max_size=192,
                batch_size=4, num_workers=0)
  batch = next(pipeline.train_iterator(config, pipeline.load_source(config, "train"), size_divisibility=32))
  assert batch["image"].shape == (4, 128, 192, 3)  # All landscape: one bucket.
  assert batch["gt_mask"].sum() > 20 and set(batch["gt_labels"][batch["gt_mask"]]) <= {0, 1, 2}


def test_the_data_package_never_imports_jax():
  """data/ is host code: no module of it imports JAX (grain, which pipeline.py loads with,
  imports JAX itself), and every module but pipeline.py and tfds.py imports without it."""
  root = pathlib.Path(pipeline.__file__).parent
  for path in sorted(root.glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      assert not [n for n in names if n.split(".")[0] in ("jax", "jaxlib", "flax", "optax")], \
          f"{path.name}:{node.lineno} imports {names}"
  modules = sorted(p.stem for p in root.glob("*.py")
                   if p.stem not in ("__init__", "pipeline", "tfds"))
  assert len(modules) >= 10
  code = textwrap.dedent(f"""
      import sys
      import sparse_rcnn_jax.data
      assert "jax" not in sys.modules
      from sparse_rcnn_jax.data import {", ".join(modules)}
      assert "jax" not in sys.modules, "imported jax"
      """)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
