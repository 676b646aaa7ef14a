"""Training: state, the sharded train step, and the loop with checkpoints and preemption.

One code path for one device, many devices and many hosts: the step is `jax.jit` with
explicit shardings over the mesh of sharding.py (batch split along "data", state
replicated). The data flows data -> model -> loss/matching -> optimizer -> checkpoint.
"""
import functools
import logging
import pathlib
import signal
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.experimental import multihost_utils

from sparse_rcnn_jax import checkpointing
from sparse_rcnn_jax import detector
from sparse_rcnn_jax import losses
from sparse_rcnn_jax import metric_writer
from sparse_rcnn_jax import optim
from sparse_rcnn_jax import sharding
from sparse_rcnn_jax import xla_cpu
from sparse_rcnn_jax.convert import checkpoint_io
from sparse_rcnn_jax.convert import official
from sparse_rcnn_jax.data import pipeline
from sparse_rcnn_jax.head_config import HeadConfig

log = logging.getLogger(__name__)


class TrainState(train_state.TrainState):
  """flax's TrainState plus the frozen batch-norm statistics, the RNG and the guard counter."""
  batch_stats: Any = None
  rng: jax.Array = None                  # raw key data (uint32), checkpointable as an array
  nonfinite_in_a_row: jax.Array = None   # updates skipped in a row for a non-finite loss/grad


def match_dataset(config: ml_collections.ConfigDict, source) -> None:
  """Sets config.model.num_classes to the dataset's number of classes (in place)."""
  if config.model.num_classes != source.num_classes:
    log.info("Setting model.num_classes = %d from the dataset.", source.num_classes)
    config.model.num_classes = source.num_classes


def init_variables(model: detector.SparseRCNN, config: ml_collections.ConfigDict,
                   rng: jax.Array, image_shape: tuple[int, int]) -> dict:
  """Randomly initialized variables, then pretrained weights named by the config, if any."""
  weights = config.model.official_checkpoint or config.model.torchvision_weights
  if weights and config.model.backbone.name != "resnet":
    raise ValueError(f"{weights} holds ResNet weights, but config.model.backbone.name is "
                     f"{config.model.backbone.name!r}; clear model.official_checkpoint and "
                     "model.torchvision_weights, or use the resnet backbone.")
  images = jnp.zeros((1, *image_shape, 3), jnp.uint8)
  whwh = jnp.ones((1, 4), jnp.float32)
  variables = jax.jit(model.init)(rng, images, whwh)
  if config.model.official_checkpoint:
    state = checkpoint_io.load_state_dict(config.model.official_checkpoint)
    variables = official.from_official(state, HeadConfig.from_config(config.model),
                                       config.model.backbone.depth)
    log.info("Loaded the official checkpoint %s", config.model.official_checkpoint)
  elif config.model.torchvision_weights:
    state = checkpoint_io.load_state_dict(config.model.torchvision_weights)
    variables = official.backbone_from_torchvision(state, variables,
                                                   config.model.backbone.depth)
    log.info("Loaded torchvision backbone weights %s", config.model.torchvision_weights)
  return jax.tree.map(jnp.asarray, variables)


def create_state(model, config, tx, variables, seed: int) -> TrainState:
  return TrainState.create(
      apply_fn=model.apply, params=variables["params"], tx=tx,
      batch_stats=variables.get("batch_stats", {}),
      rng=jax.random.key_data(jax.random.PRNGKey(seed + 1)),
      nonfinite_in_a_row=jnp.zeros((), jnp.int32))


def abstract_state(config: ml_collections.ConfigDict, mesh, image_shape=(64, 64)) -> TrainState:
  """Shapes, dtypes and (replicated) shardings of the TrainState `train` builds for `config`:
  the target to restore a checkpoint into, without allocating a model."""
  model = detector.build_model(config.model)

  def build():
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape, 3), jnp.uint8),
                           jnp.ones((1, 4), jnp.float32))
    tx = optim.make_optimizer(config.optimizer, variables["params"],
                              batch_size=config.data.batch_size,
                              num_steps=config.train.num_steps, is_frozen=model.is_frozen)
    return create_state(model, config, tx, variables, config.seed)
  shapes = jax.eval_shape(build)
  replicated = sharding.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                      shapes)


def restore_variables(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, mesh,
                      step: int | None = None) -> tuple[dict, int]:
  """({"params", "batch_stats"}, step) from the checkpoint of `step` (default: latest)."""
  manager = checkpointing.make_manager(workdir, config.train.keep_checkpoints)
  try:
    restored = checkpointing.restore(manager, abstract_state(config, mesh), step)
  finally:
    manager.close()
  if restored is None:
    raise FileNotFoundError(f"No checkpoint in {pathlib.Path(workdir) / 'checkpoints'}")
  state, _ = restored
  return {"params": state.params, "batch_stats": state.batch_stats}, int(state.step)


def train_step(state: TrainState, batch: dict, *, model, loss_config, mesh, schedule
               ) -> tuple[TrainState, dict]:
  """One update. A non-finite loss or gradient skips the update (the step still advances).

  Args:
    state: replicated TrainState.
    batch: global batch (see data/batching.py), split along the mesh's data axis.
  Returns:
    (new state, metrics of scalars: every loss term per stage, grad_norm, lr, finite).
  """
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

  def loss_fn(params):
    outputs = model.apply({"params": params, "batch_stats": state.batch_stats},
                          batch["image"], batch["image_whwh"], deterministic=False,
                          rngs={"dropout": rng})
    return losses.set_prediction_loss(outputs["pred_logits"], outputs["pred_boxes"], batch,
                                      loss_config, mesh=mesh)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updated = state.apply_gradients(grads=grads)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = state.replace(
      step=state.step + 1,
      params=keep(updated.params, state.params),
      opt_state=keep(updated.opt_state, state.opt_state),
      nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1))
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=schedule(state.step),
                 finite=finite.astype(jnp.float32))
  return new_state, metrics


def make_train_step(model, config, mesh, state: TrainState) -> Callable:
  """The jitted step with explicit shardings: state replicated, batch split over "data"."""
  schedule = optim.learning_rate(config.optimizer, config.data.batch_size, config.train.num_steps)
  step = functools.partial(train_step, model=model, loss_config=config.loss, mesh=mesh,
                           schedule=schedule)
  state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  return jax.jit(step, in_shardings=(state_sharding, sharding.batch_sharded(mesh)),
                 out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0,
                 compiler_options=xla_cpu.compiler_options())


class Preemption:
  """Turns SIGTERM / SIGINT into a flag the loop checks, so it can save before exiting."""

  def __init__(self):
    self.requested = False
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    del frame
    log.warning("Received signal %d: saving a checkpoint, then exiting.", signum)
    self.requested = True

  def any_host(self) -> bool:
    """True if any host was signalled (all hosts must stop at the same step)."""
    if jax.process_count() == 1:
      return self.requested
    return bool(multihost_utils.process_allgather(np.array(self.requested)).any())

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


class NonFiniteError(RuntimeError):
  pass


def _progress(total: int, initial: int):
  if jax.process_index() != 0:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
          evaluate_fn: Callable[[TrainState, int], dict] | None = None) -> TrainState:
  """Trains from `config`, resuming from the newest checkpoint in `workdir` if there is one.

  Args:
    config: the experiment config (configs/*.py).
    workdir: checkpoints, metrics.jsonl and config.json go here.
    evaluate_fn: called as evaluate_fn(state, step) every `config.train.eval_every` steps;
      returns scalars that are logged.
  Returns:
    The final state.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
  mesh = sharding.make_mesh()
  source = pipeline.load_source(config.data, "train")
  match_dataset(config, source)
  model = detector.build_model(config.model)
  shapes = pipeline.batch_shapes(config.data, "train")
  log.info("Training compiles %d batch shape(s): %s", len(shapes), shapes)

  variables = init_variables(model, config, jax.random.PRNGKey(config.seed), shapes[0])
  tx = optim.make_optimizer(config.optimizer, variables["params"],
                            batch_size=config.data.batch_size,
                            num_steps=config.train.num_steps, is_frozen=model.is_frozen)
  state = create_state(model, config, tx, variables, config.seed)
  state = jax.device_put(state, sharding.replicated(mesh))

  manager = checkpointing.make_manager(workdir, config.train.keep_checkpoints)
  batches = pipeline.train_iterator(config.data, source)
  restored = checkpointing.restore(manager, checkpointing.abstract_like(state))
  if restored is not None:
    state, data_state = restored
    batches.set_state(data_state)
    log.info("Resumed from step %d in %s", int(state.step), workdir)
  batches = pipeline.DevicePrefetch(batches, mesh)
  step_fn = make_train_step(model, config, mesh, state)
  writer = metric_writer.MetricWriter(workdir)
  preemption = Preemption()
  start = int(state.step)
  bar = _progress(config.train.num_steps, start)
  last_saved = start if restored is not None else None
  images_seen, tick = 0, time.perf_counter()
  try:
    for step in range(start, config.train.num_steps):
      state, metrics = step_fn(state, next(batches))
      images_seen += config.data.batch_size
      done = step + 1
      if done % config.train.log_every == 0 or done == config.train.num_steps:
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - tick
        metrics["images_per_s"] = images_seen / max(elapsed, 1e-9)
        images_seen, tick = 0, time.perf_counter()
        writer.write(done, metrics)
        if bar is not None:
          bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                          img_s=f"{metrics['images_per_s']:.1f}", refresh=False)
      if bar is not None:
        bar.update(1)
      skipped = int(state.nonfinite_in_a_row)
      if skipped >= config.train.max_nonfinite_in_a_row:
        raise NonFiniteError(
            f"The loss or gradients were not finite for {skipped} steps in a row (up to step "
            f"{done}); stopping. The last checkpoint (step {last_saved}) holds the last good "
            f"state. Lower the learning rate (it scales with the batch size) or check the data.")
      stop = preemption.any_host()
      if done % config.train.checkpoint_every == 0 or done == config.train.num_steps or stop:
        # Skipped updates leave params untouched, so a saved state is always a finite one.
        checkpointing.save(manager, done, state, batches.get_state(), force=True)
        last_saved = done
      if evaluate_fn is not None and config.train.eval_every and done % config.train.eval_every == 0:
        writer.write(done, evaluate_fn(state, done))
      if stop:
        log.warning("Stopped at step %d after a signal; checkpoint saved.", done)
        break
  finally:
    manager.wait_until_finished()
    manager.close()
    preemption.restore()
    if bar is not None:
      bar.close()
  return state
