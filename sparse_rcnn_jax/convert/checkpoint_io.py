"""Reading and writing PyTorch-style state dicts (name -> array) as `.pth` or `.npz` files.

PyTorch is not a dependency of the project: it is imported only here, only for `.pth` files,
and loading uses `weights_only=True` so a checkpoint cannot run code.
"""
import os
import pathlib

import numpy as np


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "Reading or writing .pth files needs PyTorch (pip install torch); "
        "alternatively convert the checkpoint to .npz.") from e
  return torch


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Loads a state dict from `.pth`/`.pt` (torch) or `.npz`, as float/int NumPy arrays.

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
    raise ValueError(f"{path}: expected a .pth, .pt or .npz file")
  torch = _import_torch()
  state = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
    state = state["model"]
  if not isinstance(state, dict):
    raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state)}")
  return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}


def save_state_dict(state: dict[str, np.ndarray], path: str | os.PathLike) -> None:
  """Writes a state dict as `.npz`, or as `.pth` (under "model", as the official code does)."""
  path = pathlib.Path(path)
  if path.suffix == ".npz":
    np.savez(path, **state)
    return
  torch = _import_torch()
  torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}},
             path)
