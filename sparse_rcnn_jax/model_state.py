"""The model's state: built, initialized and restored in one place for every program.

Training builds a fresh `TrainState` (random weights, then any pretrained weights the config
names, and the optimizer of optim.py) with `new_state`; evaluation, prediction and resuming
restore one from a checkpoint against `abstract_state`, the shapes of what `new_state` builds,
computed by the same code without allocating it.
"""
import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax.training import train_state

from sparse_rcnn_jax import checkpointing
from sparse_rcnn_jax import detector
from sparse_rcnn_jax import ema
from sparse_rcnn_jax import optim
from sparse_rcnn_jax import sharding
from sparse_rcnn_jax.convert import checkpoint_io
from sparse_rcnn_jax.convert import official

log = logging.getLogger(__name__)


class TrainState(train_state.TrainState):
  """flax's TrainState plus the frozen batch-norm statistics, the RNG and the parameters' moving
  average (ema.py; {} when the run keeps none). The count of updates skipped in a row for a
  non-finite loss or gradient lives in `opt_state` (optim.py)."""
  batch_stats: Any = None
  rng: jax.Array = None  # raw key data (uint32), checkpointable as an array
  ema_params: Any = None

  def eval_variables(self, use_ema: bool = True) -> dict:
    """{"params", "batch_stats"} to evaluate: the moving average of the parameters when the
    run keeps one and `use_ema`, else the parameters themselves."""
    params = self.ema_params if use_ema and self.ema_params else self.params
    return {"params": params, "batch_stats": self.batch_stats}


def _random_variables(model, rng, image_shape: tuple[int, int]) -> dict:
  images = jnp.zeros((1, *image_shape, 3), jnp.uint8)
  return model.init(rng, images, jnp.ones((1, 4), jnp.float32))


def init_variables(model: detector.SparseRCNN, config: ml_collections.ConfigDict,
                   rng: jax.Array, image_shape: tuple[int, int]) -> dict:
  """Randomly initialized variables, then the pretrained weights the config names, if any."""
  weights = config.model.official_checkpoint or config.model.torchvision_weights
  if weights and config.model.backbone.name != "resnet":
    raise ValueError(f"{weights} holds ResNet weights, but config.model.backbone.name is "
                     f"{config.model.backbone.name!r}; clear model.official_checkpoint and "
                     "model.torchvision_weights, or use the resnet backbone.")
  variables = jax.jit(lambda r: _random_variables(model, r, image_shape))(rng)
  if config.model.official_checkpoint:
    state = checkpoint_io.load_state_dict(config.model.official_checkpoint)
    variables = official.from_official(state, model.head, config.model.backbone.depth)
    log.info("Loaded the official checkpoint %s", config.model.official_checkpoint)
  elif config.model.torchvision_weights:
    state = checkpoint_io.load_state_dict(config.model.torchvision_weights)
    variables = official.backbone_from_torchvision(state, variables,
                                                   config.model.backbone.depth)
    log.info("Loaded torchvision backbone weights %s", config.model.torchvision_weights)
  return jax.tree.map(jnp.asarray, variables)


def optimizer(model: detector.SparseRCNN, config: ml_collections.ConfigDict, params):
  """The run's update rule (optim.make_optimizer) for `model`'s `params`."""
  return optim.make_optimizer(config.optimizer, params, batch_size=config.data.batch_size,
                              num_steps=config.train.num_steps, is_frozen=model.is_frozen)


def create_state(model, variables: dict, tx, seed: int, keep_ema: bool = False) -> TrainState:
  """The TrainState of `variables` ({"params"[, "batch_stats"]}) updated by `tx`; with
  `keep_ema` its moving average starts as a copy of the parameters."""
  params = variables["params"]
  return TrainState.create(
      apply_fn=model.apply, params=params, tx=tx,
      batch_stats=variables.get("batch_stats", {}),
      rng=jax.random.key_data(jax.random.PRNGKey(seed + 1)),
      # A copy, not the same buffers: the train step donates the state.
      ema_params=jax.tree.map(jnp.array, params) if keep_ema else {})


def new_state(model: detector.SparseRCNN, config: ml_collections.ConfigDict,
              image_shape: tuple[int, int]) -> TrainState:
  """A fresh TrainState for training `model` as `config` says (seed, pretrained weights,
  optimizer)."""
  variables = init_variables(model, config, jax.random.PRNGKey(config.seed), image_shape)
  return create_state(model, variables, optimizer(model, config, variables["params"]),
                      config.seed, keep_ema=ema.from_config(config.train) is not None)


def abstract_state(model: detector.SparseRCNN, config: ml_collections.ConfigDict, mesh,
                   image_shape: tuple[int, int] = (64, 64)) -> TrainState:
  """Shapes, dtypes and (replicated) shardings of the TrainState `new_state` builds: the
  target to restore a checkpoint into, without allocating a model."""
  def build(rng):
    variables = _random_variables(model, rng, image_shape)
    return create_state(model, variables, optimizer(model, config, variables["params"]),
                        config.seed, keep_ema=ema.from_config(config.train) is not None)
  shapes = jax.eval_shape(build, jax.random.PRNGKey(0))
  replicated = sharding.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                      shapes)


def restore_variables(model: detector.SparseRCNN, config: ml_collections.ConfigDict,
                      workdir: str | pathlib.Path, mesh, step: int | None = None,
                      use_ema: bool = True) -> tuple[dict, int]:
  """({"params", "batch_stats"}, step) of `model` from the checkpoint of `step` (default: the
  newest) in `workdir`: the moving average of the parameters when the run kept one
  (train.ema_decay > 0) and `use_ema`, else the parameters."""
  manager = checkpointing.make_manager(workdir, config.train.keep_checkpoints)
  try:
    restored = checkpointing.restore(manager, abstract_state(model, config, mesh), step)
  finally:
    manager.close()
  if restored is None:
    raise FileNotFoundError(f"No checkpoint in {pathlib.Path(workdir) / 'checkpoints'}")
  state, _ = restored
  return state.eval_variables(use_ema), int(state.step)
