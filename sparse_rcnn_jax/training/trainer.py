"""Training: the sharded train step, and the loop with checkpoints and preemption.

One code path for one device, many devices and many hosts: the step is `jax.jit` with
explicit shardings over the mesh of sharding.py (batch split along "data", state
replicated). The data flows data -> model -> loss/matching -> optimizer -> checkpoint.
"""
import functools
import logging
import os
import pathlib
import signal
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp

from sparse_rcnn_jax import device_batches
from sparse_rcnn_jax import sharding
from sparse_rcnn_jax import xla_cpu
from sparse_rcnn_jax.data import pipeline
from sparse_rcnn_jax.data import source as source_lib
from sparse_rcnn_jax.model import detector
from sparse_rcnn_jax.training import checkpointing
from sparse_rcnn_jax.training import ema as ema_lib
from sparse_rcnn_jax.training import losses
from sparse_rcnn_jax.training import metric_writer
from sparse_rcnn_jax.training import model_state
from sparse_rcnn_jax.training import optim

log = logging.getLogger(__name__)


def train_step(state: model_state.TrainState, batch: dict, *, model, loss_config, mesh, schedule,
               ema: ema_lib.EMA | None = None) -> tuple[model_state.TrainState, dict]:
  """One update. A non-finite loss or gradient skips the update (the step still advances):
  `state.tx` from optim.make_optimizer keeps the params and its own moments, and counts it.
  With `ema`, the parameters' moving average then follows the (possibly unchanged) params.

  Args:
    state: replicated model_state.TrainState.
    batch: global batch (see data/batching.py), split along the mesh's data axis.
    schedule: step -> learning rate, for the metric "lr".
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
  # optax.apply_if_finite looks at the gradients only: NaNs make it skip for the loss too.
  grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.nan), grads)
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=schedule(state.step),
                 finite=finite.astype(jnp.float32))
  new_state = state.apply_gradients(grads=grads)
  if ema is not None:
    new_state = new_state.replace(
        ema_params=ema.update(state.ema_params, new_state.params, new_state.step))
  return new_state, metrics


def make_train_step(model, config, mesh, state: model_state.TrainState) -> Callable:
  """The jitted step with explicit shardings: state replicated, batch split over "data"."""
  step = functools.partial(train_step, model=model, loss_config=config.loss, mesh=mesh,
                           schedule=state.tx.schedule, ema=ema_lib.from_config(config.train))
  state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  return jax.jit(step, in_shardings=(state_sharding, sharding.batch_sharded(mesh)),
                 out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0,
                 compiler_options=xla_cpu.compiler_options())


class Preemption:
  """SIGTERM or SIGINT on any host: every host saves at the same step, then exits.

  Several processes use JAX's preemption sync point, through orbax's
  `CheckpointManager.reached_preemption`: JAX's own SIGTERM handler tells every host, and they
  agree on a step without a per-step all-gather. That service exists only under
  jax.distributed and hears only SIGTERM, so one process keeps a flag of its own, and a SIGINT
  is passed on as a SIGTERM.
  """

  def __init__(self, manager: ocp.CheckpointManager):
    self._manager = manager
    self._synced = jax.process_count() > 1
    if self._synced and not jax.config.jax_enable_preemption_service:
      log.warning("jax_enable_preemption_service is off: a signal ends this run unsaved.")
    self.requested = False
    signals = (signal.SIGINT,) if self._synced else (signal.SIGTERM, signal.SIGINT)
    self._previous = {s: signal.signal(s, self._handle) for s in signals}

  def _handle(self, signum, frame):
    del frame
    log.warning("Received signal %d: saving a checkpoint, then exiting.", signum)
    if self._synced:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier
    else:
      self.requested = True

  def reached(self, step: int) -> bool:
    """True at the step where all hosts stop; call it after every step, `step` = steps done."""
    if self._synced:
      return self._manager.reached_preemption(step)
    return self.requested

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
          model: detector.SparseRCNN, source: source_lib.DetectionSource,
          evaluate_fn: Callable[[model_state.TrainState, int], dict] | None = None,
          mesh: jax.sharding.Mesh | None = None) -> model_state.TrainState:
  """Trains `model` on `source` as `config` says, resuming from the newest checkpoint in
  `workdir` if there is one. experiment.assemble builds the model and loads the source.

  Args:
    config: the experiment config (configs/*.py).
    workdir: checkpoints and metrics.jsonl go here (the config and the dataset info too, written
      by experiment.assemble).
    model: the detector, for `source`'s classes.
    source: the training split.
    evaluate_fn: called as evaluate_fn(state, step) every `config.train.eval_every` steps;
      returns scalars that are logged.
    mesh: the devices (default: sharding.make_mesh(), every device of every host).
  Returns:
    The final state.
  """
  workdir = pathlib.Path(workdir)
  mesh = sharding.make_mesh() if mesh is None else mesh
  multiple = model.backbone.size_divisibility
  log.info("Training compiles for the batch shape(s) %s",
           pipeline.batch_shapes(config.data, "train", size_divisibility=multiple))

  manager = checkpointing.make_manager(workdir, config.train.keep_checkpoints)
  batches = pipeline.train_iterator(config.data, source, jax.process_index(),
                                    jax.process_count(), size_divisibility=multiple)
  # Only a fresh run builds its state: a resumed one never reads pretrained or init_from weights.
  restored = checkpointing.restore(manager, model_state.abstract_state(model, config, mesh))
  if restored is None:
    state = jax.device_put(model_state.new_state(model, config, workdir),
                           sharding.replicated(mesh))
  else:
    state, data_state = restored
    batches.set_state(data_state)
    log.info("Resumed from step %d in %s", int(state.step), workdir)
  skips = pipeline.SkipReport(source, "train")
  batches = device_batches.DevicePrefetch(batches, mesh, skips=skips)
  step_fn = make_train_step(model, config, mesh, state)
  writer = metric_writer.MetricWriter(workdir)
  preemption = Preemption(manager)
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
      # A read of one scalar every step, on purpose: it also bounds how far the host runs ahead
      # of the devices. Runs on several CPU devices (with the matcher's host callbacks) hang
      # without such a per-step sync. Keep it.
      skipped = int(optim.nonfinite_in_a_row(state.opt_state))
      if skipped >= config.train.max_nonfinite_in_a_row:
        raise NonFiniteError(
            f"The loss or gradients were not finite for {skipped} steps in a row (up to step "
            f"{done}); stopping. The last checkpoint (step {last_saved}) holds the last good "
            f"state. Lower the learning rate (it scales with the batch size) or check the data.")
      stop = preemption.reached(done)
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
    skips.close()
    manager.wait_until_finished()
    manager.close()
    preemption.restore()
    if bar is not None:
      bar.close()
  return state
