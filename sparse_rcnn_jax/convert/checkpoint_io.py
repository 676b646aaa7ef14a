"""Reading and writing PyTorch-style state dicts (name -> array) as `.pth` or `.npz` files.

PyTorch is not a dependency of the project. `.pth` files are read by `pth.load`, a reader without
torch that accepts only tensors and plain containers, so a checkpoint cannot run code. Writing
`.pth` (done only by tests) imports torch.
"""
import os
import pathlib

import numpy as np

from sparse_rcnn_jax.convert import pth


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "Writing .pth files needs PyTorch (pip install torch); "
        "alternatively convert the checkpoint to .npz.") from e
  return torch


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Loads a state dict from `.pth`/`.pt`/`.pkl` (torch.save) or `.npz`, as NumPy arrays.

  A detectron2 / official Sparse R-CNN checkpoint keeps the weights under "model"; that level
  is unwrapped. torchvision model files are plain state dicts.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"No checkpoint file at {path}")
  if path.suffix == ".npz":
    with np.load(path) as data:
      return {k: data[k] for k in data.files}
  if path.suffix not in (".pth", ".pt", ".pkl"):
    raise ValueError(f"{path}: expected a .pth, .pt, .pkl or .npz file")
  state = pth.load(path)
  if isinstance(state, dict) and isinstance(state.get("model"), dict):
    state = state["model"]
  if not isinstance(state, dict):
    raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state)}")
  # pth.load makes arrays only of tensors: it refuses NumPy's own reconstructors.
  return {k: v for k, v in state.items() if isinstance(v, np.ndarray)}


def save_state_dict(state: dict[str, np.ndarray], path: str | os.PathLike) -> None:
  """Writes a state dict as `.npz`, or as `.pth` (under "model", as the official code does)."""
  path = pathlib.Path(path)
  if path.suffix == ".npz":
    np.savez(path, **state)
    return
  torch = _import_torch()
  torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}},
             path)
