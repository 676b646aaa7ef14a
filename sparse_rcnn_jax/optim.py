"""Optimizer and learning-rate schedule (docs/model.md, section 7), from `config.optimizer`.

AdamW with decoupled weight decay on every trainable parameter, clipping by the global norm of
the whole model's gradient, detectron2's linear warmup then step decay, and the learning rate
scaled linearly with the global batch. Frozen parameters (the model says which: the backbone's
`is_frozen`, e.g. the ResNet's stem and stages below `freeze_at`) are masked out with optax, so
neither Adam nor weight decay ever moves them.
"""
from typing import Callable

import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util


def learning_rate(optimizer: ml_collections.ConfigDict, batch_size: int, num_steps: int):
  """The schedule step -> lr of detectron2's WarmupMultiStepLR.

  lr(step) = peak * warmup(step) * decay_factor ** #{m in milestones : step >= m}, where
    peak = base_learning_rate * batch_size / base_batch_size,
    warmup(step) = warmup_factor * (1 - a) + a with a = min(step / warmup_steps, 1),
    milestones = int(f * num_steps) for each fraction f in `decay_at`.
  `step` counts updates from 0 (update 0 uses lr(0) = peak * warmup_factor). The official 3x
  recipe: peak 2.5e-5 at batch 16, warmup_factor 0.01 over 1000 steps, milestones 210000 and
  250000 of 270000, decay_factor 0.1.
  """
  peak = optimizer.base_learning_rate * batch_size / optimizer.base_batch_size
  milestones = jnp.array([int(f * num_steps) for f in optimizer.decay_at])
  warmup_steps = max(optimizer.warmup_steps, 1)

  def schedule(step):
    alpha = jnp.minimum(step / warmup_steps, 1.0)
    warmup = optimizer.warmup_factor * (1.0 - alpha) + alpha
    return peak * warmup * optimizer.decay_factor ** jnp.sum(step >= milestones)
  return schedule


def frozen_labels(params, is_frozen: Callable[[tuple[str, ...]], bool]):
  """A pytree like `params` labelling each leaf "frozen" or "train".

  `is_frozen(path)` says whether the leaf at `path` (e.g. ("backbone", "stem", "conv1",
  "kernel")) is frozen; the detector's `SparseRCNN.is_frozen` asks its backbone.
  """
  flat = traverse_util.flatten_dict(params)
  labels = {k: "frozen" if is_frozen(k) else "train" for k in flat}
  return traverse_util.unflatten_dict(labels)


def make_optimizer(optimizer: ml_collections.ConfigDict, params, *, batch_size: int,
                   num_steps: int, is_frozen: Callable[[tuple[str, ...]], bool]
                   ) -> optax.GradientTransformation:
  """The whole update rule for `params` (the "params" collection of the detector); leaves
  for which `is_frozen(path)` holds never move."""
  schedule = learning_rate(optimizer, batch_size, num_steps)
  train = optax.chain(
      optax.clip_by_global_norm(optimizer.clip_norm),
      optax.adamw(schedule, b1=optimizer.b1, b2=optimizer.b2, eps=optimizer.eps,
                  weight_decay=optimizer.weight_decay))
  return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()},
                               frozen_labels(params, is_frozen))
