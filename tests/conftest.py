"""Shared fixtures: where the reference outputs and the real datasets live.

The folder `shared/` sits beside the repository (`../shared`); set SPARSE_RCNN_SHARED to point
elsewhere. Tests that need it skip with a message naming the missing path.
"""
import os
import pathlib

from absl import flags
import pytest

# grain's loader workers read absl flags; under pytest nobody parses them (data/pipeline.py).
flags.FLAGS.mark_as_parsed()

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def shared_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("SPARSE_RCNN_SHARED", REPO_ROOT.parent / "shared"))


def _require(path: pathlib.Path) -> pathlib.Path:
  if not path.exists():
    pytest.skip(f"{path} not found (set SPARSE_RCNN_SHARED to the folder holding shared data)")
  return path


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
  """`shared/reference`: outputs of the official PyTorch head on fixed weights and inputs."""
  return _require(shared_dir() / "reference")


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  """`shared/data`: small real COCO-format datasets (bccd, coco128, coco_val128)."""
  return _require(shared_dir() / "data")
