"""Tests of the embedded synthetic shapes dataset."""
import contextlib
import io
import json
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from sparse_rcnn_jax.data import layout
from sparse_rcnn_jax.data import synthetic

SMALL = dict(num_train=10, num_val=4, image_size=96)


def _tree_bytes(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """A set big enough for statistics: ~600 objects, about 12 empty images."""
  return synthetic.generate(tmp_path_factory.mktemp("shapes") / "set", num_train=120, num_val=8,
                            image_size=96, empty_fraction=0.1, seed=3)


def _load(path: pathlib.Path | str) -> dict:
  return json.loads(pathlib.Path(path).read_text())


def _split(root: pathlib.Path, split: str) -> tuple[pathlib.Path, pathlib.Path]:
  """(json, image folder) of split "train" or "eval", found as for a user's coco_root."""
  ann, images = layout.split_in(str(root), split)
  return pathlib.Path(ann), pathlib.Path(images)


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
  a = _tree_bytes(synthetic.generate(tmp_path / "a", seed=7, **SMALL))
  b = _tree_bytes(synthetic.generate(tmp_path / "b", seed=7, **SMALL))
  c = _tree_bytes(synthetic.generate(tmp_path / "c", seed=8, **SMALL))
  assert len(a) == 1 + 2 + 10 + 4  # manifest, two jsons, images.
  assert a == b
  assert a.keys() == c.keys()
  differing = [k for k in a if a[k] != c[k]]
  assert "annotations/train.json" in differing
  assert sum(k.startswith("images/") for k in differing) == 14


def test_coco_files_load_in_pycocotools_and_boxes_are_valid(dataset):
  for split in layout.SPLITS:
    annotations, images = _split(dataset, split)
    with contextlib.redirect_stdout(io.StringIO()):
      coco = COCO(str(annotations))
    assert sorted(coco.getCatIds()) == list(synthetic.CATEGORY_IDS)
    assert [coco.cats[i]["name"] for i in synthetic.CATEGORY_IDS] == list(synthetic.CLASS_NAMES)
    for image in coco.dataset["images"]:
      with Image.open(images / image["file_name"]) as im:
        assert im.size == (image["width"], image["height"]) == (96, 96)
        assert im.mode == "RGB"
    for ann in coco.dataset["annotations"]:
      x, y, w, h = ann["bbox"]
      assert w > 0 and h > 0, ann
      assert x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96, ann
      assert ann["iscrowd"] == 0 and 0 < ann["area"] <= w * h, ann
      assert ann["visible_fraction"] >= 0.5 - 1e-3, ann


def test_sizes_counts_and_empty_images(dataset):
  coco = _load(_split(dataset, "train")[0])
  per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=121)[1:]
  assert per_image.max() <= 8
  assert 4 <= (per_image == 0).sum() <= 25  # empty_fraction=0.1 of 120.
  labels = [synthetic.CATEGORY_IDS.index(a["category_id"]) for a in coco["annotations"]]
  counts = np.bincount(labels)
  assert len(counts) == 5 and counts.min() > 0.6 * counts.mean()
  longer_side = np.array([max(a["bbox"][2:]) for a in coco["annotations"]]) / 96
  assert longer_side.min() >= 0.08 - 0.02 and longer_side.max() <= 0.6 + 0.02
  assert longer_side.min() < 0.12 and longer_side.max() > 0.45  # The whole range is used.
  assert min(a["visible_fraction"] for a in coco["annotations"]) < 0.9  # Occlusion happens.


def test_colour_does_not_tell_the_class(dataset):
  """The mean colour inside the boxes of each class is the same for every class."""
  coco = _load(_split(dataset, "train")[0])
  names = {im["id"]: im["file_name"] for im in coco["images"]}
  colours = {c: [] for c in synthetic.CATEGORY_IDS}
  for ann in coco["annotations"]:
    image = np.asarray(Image.open(_split(dataset, "train")[1] / names[ann["image_id"]]), np.float64)
    x, y, w, h = (int(round(v)) for v in ann["bbox"])
    colours[ann["category_id"]].append(image[y:y + h, x:x + w].reshape(-1, 3).mean(axis=0))
  means = np.array([np.mean(v, axis=0) for v in colours.values()])  # [classes, RGB]
  # Per-object means spread by ~50 levels; ~120 objects per class put class means within ~15.
  assert np.abs(means - means.mean(axis=0)).max() < 25, means


@pytest.mark.parametrize("class_index", range(len(synthetic.CLASS_NAMES)))
def test_box_is_the_tight_extent_of_the_rasterised_shape(class_index):
  """Checked against the drawn pixels and the shoelace area of the polygons."""
  rng = np.random.default_rng(class_index)
  cfg = synthetic.SyntheticConfig(image_size=128, min_scale=0.3)
  for _ in range(5):
    polygons, box = synthetic._place_shape(rng, class_index, cfg)
    alpha = synthetic._rasterise(polygons, box, 128)
    rows, cols = np.nonzero(alpha > 0.5)
    np.testing.assert_allclose([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], box,
                               atol=1.0)
    shoelace = sum((1 if value else -1) * 0.5 * abs(np.dot(p[:, 0], np.roll(p[:, 1], 1)) -
                                                      np.dot(p[:, 1], np.roll(p[:, 0], 1)))
                   for p, value in polygons)
    np.testing.assert_allclose(alpha.sum(), shoelace, rtol=0.03)


def test_existing_set_is_reused_and_other_arguments_are_refused(tmp_path):
  paths = synthetic.generate(tmp_path / "set", seed=1, **SMALL)
  stamp = _split(paths, "train")[0].stat().st_mtime_ns
  assert synthetic.generate(tmp_path / "set", seed=1, **SMALL) == paths
  assert _split(paths, "train")[0].stat().st_mtime_ns == stamp
  with pytest.raises(FileExistsError, match=r"seed=1 \(asked 2\)"):
    synthetic.generate(tmp_path / "set", seed=2, **SMALL)
  replaced = synthetic.generate(tmp_path / "set", seed=2, overwrite=True, **SMALL)
  assert _load(replaced / "manifest.json")["config"]["seed"] == 2
  assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_a_set_of_an_older_generator_is_written_again(tmp_path):
  """Version 1 wrote annotations/instances_{train,val}.json and images/{train,val}/: a folder
  of it with the same config is replaced by the current layout, found as a coco_root is."""
  root = tmp_path / "set"
  (root / "annotations").mkdir(parents=True)
  (root / "annotations" / "instances_train.json").write_text("{}")
  manifest = json.loads(json.dumps({"generator": "sparse_rcnn_jax.data.synthetic", "version": 1,
                                    "config": dict(synthetic.SyntheticConfig(seed=1, **SMALL)
                                                   .__dict__)}))
  (root / "manifest.json").write_text(json.dumps(manifest))
  assert synthetic.generate(root, seed=1, **SMALL) == root
  assert not (root / "annotations" / "instances_train.json").exists()
  assert _load(root / "manifest.json")["version"] == synthetic.GENERATOR_VERSION > 1
  assert len(_load(_split(root, "train")[0])["images"]) == SMALL["num_train"]


def test_folder_that_is_not_a_synthetic_set_is_never_touched(tmp_path):
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep")
  with pytest.raises(FileExistsError, match="not a synthetic dataset"):
    synthetic.generate(tmp_path / "mine", overwrite=True, **SMALL)
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_empty_folder_is_filled(tmp_path):
  (tmp_path / "empty").mkdir()
  paths = synthetic.generate(tmp_path / "empty", seed=1, **SMALL)
  assert _load(paths / "manifest.json")["config"]["seed"] == 1
  assert _split(paths, "train")[0].exists()


def test_interrupted_generation_leaves_no_half_set_and_recovers(tmp_path, monkeypatch):
  root = tmp_path / "set"
  write_split = synthetic._write_split

  def fail_on_val(root_, split, *args):
    if split == "val":
      raise KeyboardInterrupt
    write_split(root_, split, *args)

  monkeypatch.setattr(synthetic, "_write_split", fail_on_val)
  with pytest.raises(KeyboardInterrupt):
    synthetic.generate(root, **SMALL)
  assert list(tmp_path.iterdir()) == []
  monkeypatch.undo()

  # A process killed mid-write leaves its partial folder behind; a later run clears it.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  leftover = tmp_path / f".set.partial-{socket.gethostname()}-{dead.pid}-0123abcd"
  (leftover / "annotations").mkdir(parents=True)
  (leftover / "annotations" / "train.json").write_text('{"images": [')
  paths = synthetic.generate(root, **SMALL)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
  assert len(_load(_split(paths, "eval")[0])["images"]) == 4


def test_command_line(tmp_path, capsys):
  synthetic.main(["--out", str(tmp_path / "cli"), "--num_train", "3", "--num_val", "2",
                  "--image_size", "64", "--image_format", "png"])
  out = capsys.readouterr().out
  assert "train: 3 images" in out and "val: 2 images" in out
  assert len(list((tmp_path / "cli" / "images" / "val").glob("*.png"))) == 2


def test_bad_arguments_are_explained(tmp_path):
  with pytest.raises(ValueError, match="min_scale"):
    synthetic.generate(tmp_path / "x", min_scale=0.7, max_scale=0.5)
  with pytest.raises(ValueError, match="image_format"):
    synthetic.generate(tmp_path / "x", image_format="gif")


def test_config_fields_reach_the_generator(tmp_path):
  """configs set the set's difficulty as data: every data.synthetic field but root is passed,
  and the source reads the set it generated without changing the config."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from sparse_rcnn_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  data = ml_collections.ConfigDict({"source": "synthetic", "synthetic": dict(
      root=str(tmp_path / "set"), num_train=6, num_val=2, image_size=64, seed=3,
      max_objects=2, empty_fraction=0.0, min_scale=0.3, max_scale=0.5),
      "on_bad_annotation": "error", "on_bad_image": "skip"})
  before = data.to_json()
  train, val = pipeline.load_source(data, "train"), pipeline.load_source(data, "eval")
  assert data.to_json() == before
  assert (len(train), len(val)) == (6, 2) and train.class_names == synthetic.CLASS_NAMES
  manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
  assert "max_objects" in json.dumps(manifest) and "0.3" in json.dumps(manifest)
  coco = json.loads(pathlib.Path(train.ann_path).read_text())
  per_image = np.bincount([a["image_id"] for a in coco["annotations"]])
  assert len(coco["images"]) == 6 and per_image.max() <= 2
  sides = [max(a["bbox"][2:]) for a in coco["annotations"]]
  assert min(sides) >= 0.3 * 64 - 2 and max(sides) <= 0.5 * 64 + 2, sides

  data.synthetic.max_object = 3
  with pytest.raises(ValueError, match="max_object"):
    pipeline.load_source(data, "train")


def test_the_set_is_a_coco_root(tmp_path):
  """A generated set is an ordinary dataset: `config.data.coco_root` pointed at it gives the
  same images, boxes and labels as the synthetic source, in both splits."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from sparse_rcnn_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  root = synthetic.generate(tmp_path / "set", seed=4, **SMALL)
  common = {"on_bad_annotation": "error", "on_bad_image": "error"}
  as_synthetic = ml_collections.ConfigDict(
      {"source": "synthetic", "synthetic": dict(root=str(root), seed=4, **SMALL), **common})
  as_coco = ml_collections.ConfigDict({"source": "coco", "coco_root": str(root), **common})
  for split, count in (("train", SMALL["num_train"]), ("eval", SMALL["num_val"])):
    a, b = pipeline.load_source(as_synthetic, split), pipeline.load_source(as_coco, split)
    assert len(a) == len(b) == count and a.info == b.info
    assert a.info.class_names == synthetic.CLASS_NAMES
    for i in range(count):
      x, y = a.example(i), b.example(i)
      np.testing.assert_array_equal(x.image, y.image)
      np.testing.assert_array_equal(x.boxes, y.boxes)
      np.testing.assert_array_equal(x.labels, y.labels)
