"""Optimizer and learning-rate schedule (docs/model.md, section 7), from `config.optimizer`.

AdamW with decoupled weight decay on every trainable parameter, clipping by the global norm of
the whole model's gradient, detectron2's linear warmup then step decay, and the learning rate
scaled linearly with the global batch; the backbone's trainable parameters may learn at a
fraction of that rate (`backbone_multiplier`, detectron2's SOLVER.BACKBONE_MULTIPLIER: a
pretrained backbone fine-tuned gently while the head learns from scratch). Frozen parameters (the model says which: the backbone's
`is_frozen`, e.g. the ResNet's stem and stages below `freeze_at`) are masked out with optax, so
neither Adam nor weight decay ever moves them. A non-finite gradient skips the update with
`optax.apply_if_finite`, which also counts such updates in a row in the optimizer state (the
trainer stops on that count, so the wrapper never gives up and applies one itself).
"""
import collections
from typing import Callable, NamedTuple

import jax
import ml_collections
import numpy as np
import optax
from flax import traverse_util


class Optimizer(NamedTuple):
  """optax's (init, update) pair plus the learning-rate schedule it follows, so that the
  trainer logs the learning rate from the very schedule the update uses."""
  init: optax.TransformInitFn
  update: optax.TransformUpdateFn
  schedule: optax.Schedule


def learning_rate(optimizer: ml_collections.ConfigDict, batch_size: int,
                  num_steps: int) -> optax.Schedule:
  """The schedule step -> lr of detectron2's WarmupMultiStepLR, from optax's pieces.

  lr(step) = peak * warmup(step) * decay_factor ** #{m in milestones : step >= m}, where
    peak = base_learning_rate * batch_size / base_batch_size,
    warmup(step) = warmup_factor * (1 - a) + a with a = step / warmup_steps before step
      warmup_steps and 1 from then on (so 1 throughout when warmup_steps is 0),
    milestones = int(f * num_steps) for each fraction f in `decay_at` (a milestone inside the
      warmup multiplies too; a repeated one counts twice).
  `step` counts updates from 0 (update 0 uses lr(0) = peak * warmup_factor). The official 3x
  recipe: peak 2.5e-5 at batch 16, warmup_factor 0.01 over 1000 steps, milestones 210000 and
  250000 of 270000, decay_factor 0.1. optax's linear form (I - E) * (1 - a) + E agrees with
  this float64 formula to 2e-6 relative in the first warmup steps and to a few float32 ulps
  elsewhere.
  """
  peak = optimizer.base_learning_rate * batch_size / optimizer.base_batch_size
  warmup = optax.join_schedules(
      [optax.linear_schedule(peak * optimizer.warmup_factor, peak, optimizer.warmup_steps),
       optax.constant_schedule(peak)], [optimizer.warmup_steps])
  milestones = collections.Counter(int(f * num_steps) for f in optimizer.decay_at)
  decay = optax.piecewise_constant_schedule(
      1.0, {m: optimizer.decay_factor ** n for m, n in milestones.items()})
  return lambda step: warmup(step) * decay(step)


def frozen_labels(params, is_frozen: Callable[[tuple[str, ...]], bool],
                  separate_backbone: bool = False):
  """A pytree like `params` labelling each leaf "frozen" or "train" (or, with
  `separate_backbone`, "backbone" for the trainable leaves under "backbone").

  `is_frozen(path)` says whether the leaf at `path` (e.g. ("backbone", "stem", "conv1",
  "kernel")) is frozen; the detector's `SparseRCNN.is_frozen` asks its backbone.
  """
  def label(path):
    if is_frozen(path):
      return "frozen"
    return "backbone" if separate_backbone and path[0] == "backbone" else "train"

  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: label(k) for k in flat})


def make_optimizer(optimizer: ml_collections.ConfigDict, params, *, batch_size: int,
                   num_steps: int, is_frozen: Callable[[tuple[str, ...]], bool]) -> Optimizer:
  """The whole update rule for `params` (the "params" collection of the detector) and its
  schedule; leaves for which `is_frozen(path)` holds never move. An update whose gradients are
  not all finite is skipped: the params and Adam's moments and count stay as they were."""
  schedule = learning_rate(optimizer, batch_size, num_steps)

  def adamw(lr):
    return optax.adamw(lr, b1=optimizer.b1, b2=optimizer.b2, eps=optimizer.eps,
                       weight_decay=optimizer.weight_decay)

  multiplier = optimizer.get("backbone_multiplier", 1.0)  # runs saved before the field: 1
  if multiplier == 1.0:
    masked = optax.multi_transform(
        {"train": optax.chain(optax.clip_by_global_norm(optimizer.clip_norm), adamw(schedule)),
         "frozen": optax.set_to_zero()}, frozen_labels(params, is_frozen))
  else:
    # One clip over every trainable gradient (frozen ones zeroed first), then each group's lr.
    labels = frozen_labels(params, is_frozen, separate_backbone=True)
    masked = optax.chain(
        optax.multi_transform({"frozen": optax.set_to_zero(), "train": optax.identity(),
                               "backbone": optax.identity()}, labels),
        optax.clip_by_global_norm(optimizer.clip_norm),
        optax.multi_transform({"frozen": optax.set_to_zero(), "train": adamw(schedule),
                               "backbone": adamw(lambda step: multiplier * schedule(step))},
                              labels))
  tx = optax.apply_if_finite(masked, max_consecutive_errors=np.iinfo(np.int32).max)
  return Optimizer(tx.init, tx.update, schedule)


def nonfinite_in_a_row(opt_state) -> jax.Array:
  """How many updates in a row were skipped for a non-finite gradient: the count of
  `optax.apply_if_finite` in `opt_state` (the state of a `make_optimizer` optimizer)."""
  return optax.tree.get(opt_state, "notfinite_count")
