"""Optimizer and learning-rate schedule (SPEC.md section 7), from `config.optimizer`.

AdamW with decoupled weight decay on every trainable parameter, clipping by the global norm of
the whole model's gradient, detectron2's linear warmup then step decay, and the learning rate
scaled linearly with the global batch. Frozen backbone parts (stem, res2, ... below
`freeze_at`) are masked out with optax, so neither Adam nor weight decay ever moves them.
"""
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

FROZEN_STAGES = ("stem", "res2", "res3", "res4", "res5")


def learning_rate(optimizer: ml_collections.ConfigDict, batch_size: int, num_steps: int):
  """The schedule step -> lr of detectron2's WarmupMultiStepLR.

  lr = peak * warmup(step) * decay_factor ** (milestones passed), with peak = base lr *
  batch_size / base_batch_size, warmup rising linearly from `warmup_factor` to 1 over
  `warmup_steps`, and milestones at the fractions `decay_at` of `num_steps` (absolute steps).
  """
  peak = optimizer.base_learning_rate * batch_size / optimizer.base_batch_size
  milestones = jnp.array([int(f * num_steps) for f in optimizer.decay_at])
  warmup_steps = max(optimizer.warmup_steps, 1)

  def schedule(step):
    alpha = jnp.minimum(step / warmup_steps, 1.0)
    warmup = optimizer.warmup_factor * (1.0 - alpha) + alpha
    return peak * warmup * optimizer.decay_factor ** jnp.sum(step >= milestones)
  return schedule


def frozen_labels(params, freeze_at: int):
  """A pytree like `params` labelling each leaf "frozen" or "train".

  freeze_at = 0 freezes nothing, 1 the stem, 2 the stem and res2 (the official setting), ...
  """
  frozen = set(FROZEN_STAGES[:freeze_at])
  flat = traverse_util.flatten_dict(params)
  labels = {k: "frozen" if k[0] == "backbone" and k[1] in frozen else "train" for k in flat}
  return traverse_util.unflatten_dict(labels)


def make_optimizer(optimizer: ml_collections.ConfigDict, params, *, batch_size: int,
                   num_steps: int, freeze_at: int) -> optax.GradientTransformation:
  """The whole update rule for `params` (the "params" collection of the detector)."""
  schedule = learning_rate(optimizer, batch_size, num_steps)
  train = optax.chain(
      optax.clip_by_global_norm(optimizer.clip_norm),
      optax.adamw(schedule, b1=optimizer.b1, b2=optimizer.b2, eps=optimizer.eps,
                  weight_decay=optimizer.weight_decay))
  return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()},
                               frozen_labels(params, freeze_at))
