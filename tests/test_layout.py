"""Dataset folder layouts (`config.data.coco_root`) and the recipes of configs/custom.py and
configs/synthetic.py."""
import json
import os
import pathlib

import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import bccd
from configs import custom
from configs import r50_100pro_3x
from configs import synthetic
from sparse_rcnn_jax.data import config as data_config
from sparse_rcnn_jax.data import layout
from sparse_rcnn_jax.data import pipeline

CATEGORIES = ({"id": 1, "name": "cat"}, {"id": 2, "name": "dog"})


def write_split(ann_path: pathlib.Path, image_dir: pathlib.Path, num_images: int,
                prefix: str, categories=CATEGORIES) -> None:
  """`num_images` 40x32 (w x h) JPEGs `{prefix}{k}.jpg` in image_dir, each with one box, and
  their instances json at ann_path."""
  ann_path.parent.mkdir(parents=True, exist_ok=True)
  image_dir.mkdir(parents=True, exist_ok=True)
  images, annotations = [], []
  for k in range(num_images):
    name = f"{prefix}{k}.jpg"
    pixels = np.full((32, 40, 3), (20 * k % 250, 90, 160), np.uint8)
    pixels[4:20, 6:30] = 255
    Image.fromarray(pixels).save(image_dir / name, quality=90)
    images.append({"id": k + 1, "file_name": name, "height": 32, "width": 40})
    annotations.append({"id": k + 1, "image_id": k + 1,
                        "category_id": categories[k % len(categories)]["id"],
                        "bbox": [6, 4, 24, 16]})
  ann_path.write_text(json.dumps({"images": images, "annotations": annotations,
                                  "categories": list(categories)}))


# Layout name -> (root, split name) -> (json, image folder), written out by hand (not through
# layout.LAYOUTS, so a wrong path there fails).
def _annotations_paths(root, name):
  return root / "annotations" / f"{name}.json", root / "images"


def _coco_paths(root, name):
  return root / "annotations" / f"instances_{name}2017.json", root / f"{name}2017"


def _roboflow_paths(root, name):
  return root / name / "_annotations.coco.json", root / name


LAYOUT_PATHS = {
    "annotations/": (_annotations_paths, "train", "val"),
    "COCO": (_coco_paths, "train", "val"),
    "Roboflow": (_roboflow_paths, "train", "valid"),
}
NUM_TRAIN, NUM_EVAL = 3, 2


def make_layout(root: pathlib.Path, name: str, with_eval: bool = True):
  """Writes a dataset in layout `name`: NUM_TRAIN training and NUM_EVAL validation images.

  Returns ((train json, train images), (eval json, eval images) or None), as strings.
  """
  paths, train_name, eval_name = LAYOUT_PATHS[name]
  train = paths(root, train_name)
  write_split(*train, NUM_TRAIN, "tr")
  if not with_eval:
    return tuple(map(str, train)), None
  evaluation = paths(root, eval_name)
  write_split(*evaluation, NUM_EVAL, "ev")
  return tuple(map(str, train)), tuple(map(str, evaluation))


def data_cfg(**fields):
  cfg = data_config.default_config()
  cfg.update(**{k: os.fspath(v) if isinstance(v, pathlib.Path) else v
                for k, v in fields.items()})
  return cfg


def test_layouts_are_the_three_documented_ones():
  assert [l.name for l in layout.LAYOUTS] == ["annotations/", "COCO", "Roboflow"]
  assert layout.SPLITS == ("train", "eval")


@pytest.mark.parametrize("name", sorted(LAYOUT_PATHS))
def test_each_layout_names_its_splits_and_loads(tmp_path, name):
  train, evaluation = make_layout(tmp_path, name)
  cfg = data_cfg(coco_root=tmp_path)
  assert layout.find_layout(str(tmp_path)).name == name
  assert layout.coco_split(cfg, "train") == train
  assert layout.coco_split(cfg, "eval") == evaluation
  assert pipeline.has_eval_split(cfg)
  train_source = pipeline.load_source(cfg, "train")
  eval_source = pipeline.load_source(cfg, "eval")
  assert len(train_source) == NUM_TRAIN and len(eval_source) == NUM_EVAL
  assert train_source.class_names == eval_source.class_names == ("cat", "dog")
  assert train_source.num_classes == 2
  assert train_source.ann_path == train[0] and eval_source.ann_path == evaluation[0]
  assert sorted(train_source.table.file_names) == ["tr0.jpg", "tr1.jpg", "tr2.jpg"]
  assert sorted(eval_source.table.file_names) == ["ev0.jpg", "ev1.jpg"]
  assert train_source.num_boxes.tolist() == [1] * NUM_TRAIN
  example = train_source.example(0)
  assert example.image.shape == (32, 40, 3)
  np.testing.assert_allclose(example.boxes, [[6, 4, 30, 20]])


@pytest.mark.parametrize("name", sorted(LAYOUT_PATHS))
def test_a_layout_without_a_validation_split_trains_without_evaluating(tmp_path, name):
  train, evaluation = make_layout(tmp_path, name, with_eval=False)
  assert evaluation is None
  cfg = data_cfg(coco_root=tmp_path)
  assert layout.coco_split(cfg, "train") == train
  assert layout.coco_split(cfg, "eval") is None
  assert not pipeline.has_eval_split(cfg)
  assert len(pipeline.load_source(cfg, "train")) == NUM_TRAIN
  with pytest.raises(ValueError, match="No eval split"):
    pipeline.load_source(cfg, "eval")


@pytest.mark.parametrize("name,eval_name", [("annotations/", "valid"), ("annotations/", "test"),
                                            ("Roboflow", "val"), ("Roboflow", "test")])
def test_other_names_of_the_validation_split(tmp_path, name, eval_name):
  paths, train_name, _ = LAYOUT_PATHS[name]
  write_split(*paths(tmp_path, train_name), NUM_TRAIN, "tr")
  ann, images = paths(tmp_path, eval_name)
  write_split(ann, images, NUM_EVAL, "ev")
  cfg = data_cfg(coco_root=tmp_path)
  assert layout.coco_split(cfg, "eval") == (str(ann), str(images))
  assert len(pipeline.load_source(cfg, "eval")) == NUM_EVAL


def test_the_first_matching_layout_wins(tmp_path):
  annotations = make_layout(tmp_path, "annotations/", with_eval=False)[0]
  write_split(*_roboflow_paths(tmp_path, "train"), 5, "rf")
  cfg = data_cfg(coco_root=tmp_path)
  assert layout.find_layout(str(tmp_path)).name == "annotations/"
  assert layout.coco_split(cfg, "train") == annotations


def test_split_names_are_checked(tmp_path):
  make_layout(tmp_path, "COCO")
  with pytest.raises(ValueError, match="split must be one of"):
    layout.coco_split(data_cfg(coco_root=tmp_path), "val")


def test_explicit_fields_override_coco_root_split_by_split(tmp_path):
  _, evaluation = make_layout(tmp_path / "dataset", "COCO")
  other_ann, other_images = tmp_path / "other" / "mine.json", tmp_path / "other" / "pics"
  write_split(other_ann, other_images, 5, "own")
  cfg = data_cfg(coco_root=tmp_path / "dataset", train_ann=other_ann, train_images=other_images)
  assert layout.coco_split(cfg, "train") == (str(other_ann), str(other_images))
  assert layout.coco_split(cfg, "eval") == evaluation
  train_source = pipeline.load_source(cfg, "train")
  assert len(train_source) == 5 and train_source.ann_path == str(other_ann)
  assert len(pipeline.load_source(cfg, "eval")) == NUM_EVAL
  # The other way round: explicit eval, layout train.
  cfg = data_cfg(coco_root=tmp_path / "dataset", eval_ann=other_ann, eval_images=other_images)
  assert layout.coco_split(cfg, "train")[0].endswith("instances_train2017.json")
  assert len(pipeline.load_source(cfg, "train")) == NUM_TRAIN
  assert len(pipeline.load_source(cfg, "eval")) == 5


def test_explicit_fields_alone_need_no_coco_root(tmp_path):
  ann, images = tmp_path / "a.json", tmp_path / "imgs"
  write_split(ann, images, 2, "x")
  cfg = data_cfg(train_ann=ann, train_images=images)
  assert layout.coco_split(cfg, "train") == (str(ann), str(images))
  assert layout.coco_split(cfg, "eval") is None and not pipeline.has_eval_split(cfg)


def test_no_split_named_at_all():
  cfg = data_cfg()
  assert layout.coco_split(cfg, "train") is None
  assert not pipeline.has_eval_split(cfg)
  with pytest.raises(ValueError, match=r"No train split: set config\.data\.coco_root"):
    pipeline.load_source(cfg, "train")


@pytest.mark.parametrize("split", ["train", "eval"])
@pytest.mark.parametrize("which", ["ann", "images"])
def test_half_an_explicit_split_is_an_error_naming_both_fields(tmp_path, split, which):
  make_layout(tmp_path, "annotations/")
  cfg = data_cfg(coco_root=tmp_path, **{f"{split}_{which}": tmp_path / "something"})
  with pytest.raises(ValueError) as error:
    layout.coco_split(cfg, split)
  message = str(error.value)
  assert f"config.data.{split}_ann" in message and f"config.data.{split}_images" in message
  assert "something" in message


def test_a_folder_in_no_known_layout_lists_every_path_looked_for(tmp_path):
  (tmp_path / "annotations").mkdir()
  (tmp_path / "annotations" / "instances.json").write_text("{}")
  (tmp_path / "images").mkdir()
  cfg = data_cfg(coco_root=tmp_path)
  with pytest.raises(FileNotFoundError) as error:
    layout.coco_split(cfg, "train")
  message = str(error.value)
  for path in (tmp_path / "annotations" / "train.json",
               tmp_path / "annotations" / "instances_train2017.json",
               tmp_path / "train" / "_annotations.coco.json"):
    assert str(path) in message
  for name in ("annotations/ layout", "COCO layout", "Roboflow layout", "config.data.train_ann"):
    assert name in message
  # The same error from loading and from has_eval_split (the folder is unusable either way).
  with pytest.raises(FileNotFoundError, match="_annotations.coco.json"):
    pipeline.load_source(cfg, "train")
  with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
    pipeline.has_eval_split(cfg)


def test_coco_root_that_is_not_a_folder(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError, match="is not a folder") as error:
    layout.coco_split(data_cfg(coco_root=missing), "train")
  assert str(missing) in str(error.value)
  a_file = tmp_path / "train.json"
  a_file.write_text("{}")
  with pytest.raises(FileNotFoundError, match="is not a folder"):
    layout.coco_split(data_cfg(coco_root=a_file), "eval")


@pytest.mark.parametrize("name,folder,split", [
    ("COCO", "train2017", "train"), ("COCO", "val2017", "eval"),
    ("annotations/", "images", "train"), ("annotations/", "images", "eval")])
def test_a_json_without_its_image_folder_names_the_folder(tmp_path, name, folder, split):
  make_layout(tmp_path, name)
  for image in (tmp_path / folder).iterdir():
    image.unlink()
  (tmp_path / folder).rmdir()
  with pytest.raises(FileNotFoundError) as error:
    layout.coco_split(data_cfg(coco_root=tmp_path), split)
  message = str(error.value)
  assert str(tmp_path / folder) in message and name in message


# configs/custom.py

def test_custom_default_recipe_starts_from_imagenet_weights():
  config = custom.get_config()
  assert config.data.source == "coco" and config.data.coco_root == ""
  backbone = config.model.backbone
  assert backbone.weights == "imagenet" and backbone.norm == "frozen_bn"
  assert backbone.name in ("efficientnet_lite", "mobilenet_v2")
  assert config.model.num_proposals < 100 and config.data.test_scale < 800
  assert custom.get_config("pretrained").to_dict() == config.to_dict()
  # coco_root on the command line is all a user sets: it is a field of the config.
  config.data.coco_root = "/some/where"
  assert config.data.coco_root == "/some/where"


def test_custom_scratch_recipe_is_the_small_resnet_without_weights():
  config = custom.get_config("scratch")
  backbone = config.model.backbone
  assert backbone.name == "resnet" and backbone.depth == 18 and backbone.width == 16
  assert backbone.norm == "group_norm" and backbone.freeze_at == 0 and backbone.weights == ""
  assert config.data.test_scale == 256 and config.data.max_size == 384
  # The head is the default recipe's: only the backbone, the sizes and the schedule differ.
  default = custom.get_config()
  for field in ("num_proposals", "num_stages", "hidden_dim", "dim_feedforward", "dim_dynamic"):
    assert config.model[field] == default.model[field], field


def test_custom_r50_recipe_builds_and_keeps_the_official_model():
  config = custom.get_config("r50")
  official = r50_100pro_3x.get_config()
  assert config.data.batch_size == 4 and config.data.test_scale == official.data.test_scale
  assert config.model.to_dict() == official.model.to_dict()
  assert config.tta.to_dict() == official.tta.to_dict()
  assert config.train.num_steps == 90_000


def test_custom_unknown_recipe():
  with pytest.raises(ValueError, match="'pretrained'.*'scratch'.*'r50'") as error:
    custom.get_config("r18")
  assert "r18" in str(error.value)


# configs/synthetic.py (the main job)

def test_main_job_starts_from_imagenet_weights_and_scratch_is_one_word_away():
  config = synthetic.get_config()
  assert config.data.source == "synthetic"
  backbone = config.model.backbone
  assert backbone.name == "efficientnet_lite" and backbone.weights == "imagenet"
  assert backbone.norm == "frozen_bn" and backbone.freeze_at == 4
  assert synthetic.get_config("pretrained").to_dict() == config.to_dict()
  scratch = synthetic.get_config("scratch")
  assert scratch.model.backbone.name == "resnet" and scratch.model.backbone.weights == ""
  assert scratch.model.backbone.norm == "group_norm" and scratch.model.backbone.freeze_at == 0
  # Only the backbone and the number of steps differ: the data, head and optimizer are shared.
  assert scratch.train.num_steps > config.train.num_steps
  for part in ("data", "loss", "optimizer", "tta"):
    assert scratch[part].to_dict() == config[part].to_dict(), part
  assert ({k: v for k, v in scratch.model.items() if k != "backbone"}
          == {k: v for k, v in config.model.items() if k != "backbone"})
  with pytest.raises(ValueError, match="'pretrained'.*'scratch'"):
    synthetic.get_config("r50")


def _tta_values(tta) -> dict:
  return dict(min_sizes=tuple(tta.min_sizes), max_size=tta.max_size,
              scale_ranges=tuple(tuple(r) for r in tta.scale_ranges))


def test_scaled_tta_is_the_bccd_tta_and_scales_by_test_scale_over_800():
  official = custom.get_config("r50").tta
  bccd_config = bccd.get_config()
  bccd_tta = bccd_config.tta
  assert _tta_values(ml_collections.ConfigDict(
      custom.scaled_tta(official, bccd_config.data.test_scale))) == _tta_values(bccd_tta)
  assert custom.get_config().tta.to_dict() == bccd_tta.to_dict()
  scaled = custom.scaled_tta(official, 256)
  assert _tta_values(ml_collections.ConfigDict(scaled)) == _tta_values(custom.get_config("scratch").tta)
  # Independently: each side and bound times 256 / 800, rounded; 10000 (no limit) kept.
  assert tuple(scaled["min_sizes"]) == tuple(round(s * 256 / 800) for s in official.min_sizes)
  assert tuple(scaled["min_sizes"]) == (128, 160, 192, 205, 224, 288, 320, 352, 384, 416, 448,
                                        576, 256)
  assert scaled["max_size"] == 1280
  assert tuple(map(tuple, scaled["scale_ranges"])) == (
      (31, 10000), (31, 10000), (20, 10000), (20, 10000), (20, 10000), (0, 10000), (0, 10000),
      (0, 82), (0, 82), (0, 61), (0, 61), (0, 31), (0, 10000))
  # What scaling leaves alone.
  assert bccd_tta.flip == official.flip and bccd_tta.vote_iou == official.vote_iou
  assert bccd_tta.max_detections == official.max_detections
  # At 800 it is the identity.
  assert _tta_values(ml_collections.ConfigDict(custom.scaled_tta(official, 800))) == _tta_values(official)
