"""Tried as a new user would: the real sets laid out the usual ways, read through one flag.

BCCD becomes a Roboflow export (train/, valid/ with _annotations.coco.json), coco128 and
coco_val128 a COCO folder (annotations/instances_{train,val}2017.json, train2017/, val2017/),
both made of links in a temporary folder. The slow tests train configs/custom.py on them with
only --config.data.coco_root and check the AP the README states:

  python -m pytest -m slow tests/test_custom_dataset.py
"""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from sparse_rcnn_jax.data import check
from sparse_rcnn_jax.data import config as data_config
from sparse_rcnn_jax.data import layout
from sparse_rcnn_jax.data import pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]
# XLA:CPU rounds differently on other processor models (README: the same run gave AP 30.8 and
# 32.1 on two machines); below the README's figure by more than this is a failure.
AP_TOLERANCE = 2.5


def roboflow_bccd(data_dir: pathlib.Path, root: pathlib.Path) -> pathlib.Path:
  """BCCD trainval -> train/, test -> valid/, as Roboflow exports it (json beside the images)."""
  bccd = data_dir / "bccd"
  for split, ann in (("train", "instances_trainval.json"), ("valid", "instances_test.json")):
    folder = root / split
    folder.mkdir(parents=True)
    (folder / "_annotations.coco.json").symlink_to(bccd / ann)
    for image in json.loads((bccd / ann).read_text())["images"]:
      (folder / image["file_name"]).symlink_to(bccd / "JPEGImages" / image["file_name"])
  return root


def coco_layout_coco128(data_dir: pathlib.Path, root: pathlib.Path) -> pathlib.Path:
  """coco128 -> train2017, coco_val128 -> val2017, with COCO's annotation names."""
  (root / "annotations").mkdir(parents=True)
  (root / "annotations" / "instances_train2017.json").symlink_to(
      data_dir / "coco128" / "annotations" / "instances_train2017.json")
  (root / "annotations" / "instances_val2017.json").symlink_to(
      data_dir / "coco_val128" / "instances_val2017_first128.json")
  (root / "train2017").symlink_to(data_dir / "coco128" / "train2017")
  (root / "val2017").symlink_to(data_dir / "coco_val128" / "val2017")
  return root


LAYOUTS = {"bccd": (roboflow_bccd, "Roboflow", (292, 72)),
           "coco128": (coco_layout_coco128, "COCO", (128, 128))}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_real_sets_load_through_coco_root_alone(data_dir, tmp_path, name):
  make, layout_name, sizes = LAYOUTS[name]
  root = make(data_dir, tmp_path / name)
  config = data_config.default_config()
  config.coco_root = str(root)
  assert layout.find_layout(str(root)).name == layout_name
  assert pipeline.has_eval_split(config)
  for split, size in zip(layout.SPLITS, sizes):
    assert len(pipeline.load_source(config, split)) == size
  reports = check.check(config)
  assert [r.split for r in reports] == ["train", "eval"]
  assert not any(r.fatal or r.scan.image_problems or r.scan.annotation_problems
                 for r in reports)


def readme_ap(name: str) -> float:
  """The AP the README's own-dataset table states for `name`."""
  text = (REPO / "README.md").read_text()
  row = re.search(rf"^\| {re.escape(name)} .*$", text, re.MULTILINE)
  assert row, f"no README row for {name}"
  return float(row.group(0).split("|")[3])


@pytest.mark.slow
@pytest.mark.parametrize("name,row", [("bccd", "BCCD"), ("coco128", "coco128")])
def test_custom_config_reaches_the_readme_ap(data_dir, tmp_path, name, row):
  root = LAYOUTS[name][0](data_dir, tmp_path / name)
  workdir = tmp_path / "workdir"
  subprocess.run([sys.executable, "train.py", "--config", "configs/custom.py", "--workdir",
                  str(workdir), f"--config.data.coco_root={root}"], cwd=REPO, check=True,
                 env={**os.environ, "PYTHONPATH": str(REPO)})
  final = max(workdir.glob("eval_step*.json"), key=lambda p: int(p.stem.split("step")[1]))
  ap = 100 * json.loads(final.read_text())["AP"]
  assert ap >= readme_ap(row) - AP_TOLERANCE
