"""Checkpoints of a training run with orbax: train state plus the data iterator's position.

Saves are periodic and asynchronous, the newest `keep` are kept, and restoring is always
against an abstract target (shapes, dtypes and shardings), so arrays land directly on the
right devices of the current mesh.
"""
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


def make_manager(workdir: str | pathlib.Path, keep: int) -> ocp.CheckpointManager:
  """A manager writing to WORKDIR/checkpoints, keeping the newest `keep` steps."""
  directory = pathlib.Path(workdir).resolve() / "checkpoints"
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, enable_async_checkpointing=True, create=True))


def has_checkpoint(workdir: str | pathlib.Path) -> bool:
  """Whether WORKDIR/checkpoints holds a finished checkpoint (the folder is not created)."""
  directory = pathlib.Path(workdir).resolve() / "checkpoints"
  return directory.is_dir() and bool(ocp.utils.checkpoint_steps(directory))


def stored_shapes(workdir: str | pathlib.Path, step: int | None = None) -> dict[str, tuple]:
  """The shape of every array of the train state saved at `step` (default: the newest), by
  "/"-joined path ("params/head/..."), from the checkpoint's metadata alone; {} without one."""
  directory = pathlib.Path(workdir).resolve() / "checkpoints"
  steps = ocp.utils.checkpoint_steps(directory) if directory.is_dir() else []
  if not steps:
    return {}
  tree = ocp.StandardCheckpointHandler().metadata(
      directory / str(max(steps) if step is None else step) / "state")
  def name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
  return {name(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict,
         force: bool = False) -> bool:
  """Starts an asynchronous save of `state` (a pytree of arrays) and the data position."""
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)


def abstract_like(state: Any) -> Any:
  """Shapes, dtypes and shardings of `state`, the target a restore fills in."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      state)


def restore(manager: ocp.CheckpointManager, abstract_state: Any,
            step: int | None = None) -> tuple[Any, dict] | None:
  """(state, data_state) of `step` (default: the latest), or None if there is no checkpoint."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return restored["state"], restored["data"]
