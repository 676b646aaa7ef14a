"""Model EMA: an exponential moving average of the parameters, evaluated instead of them.

As DiffusionDet keeps it (its MODEL_EMA: off by default, decay 0.999): the average starts as
the parameters training starts from (after any pretrained weights are loaded) and follows
every update t = 1, 2, ... (skipped non-finite updates included, as there):

  ema_t = d_t * ema_{t-1} + (1 - d_t) * params_t,
  d_t = decay, or with a warm-up of W steps d_t = decay * (1 - exp(-t / W))

(the warm-up is DiffusionDet's YOLOX option, which uses decay 0.9998 and W = 2000: early
averages then forget the random start quickly). DiffusionDet averages the buffers too; ours are
the frozen batch-norm statistics, constants, so only "params" is averaged. The update is
written ema + (1 - d) * (params - ema), the same average, so a parameter that never moves (a
frozen one) stays bit-exact instead of drifting by rounding (optax.incremental_update's
d * ema + (1 - d) * params would move it).
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections


class EMA(NamedTuple):
  """The averaging rule: `decay` in (0, 1), `warmup_steps` W (0: a constant decay)."""
  decay: float
  warmup_steps: int = 0

  def decay_at(self, step: jax.Array) -> jax.Array:
    """d_t for update number `step` (t = 1 for the first update)."""
    if not self.warmup_steps:
      return jnp.asarray(self.decay, jnp.float32)
    t = jnp.asarray(step, jnp.float32)
    return self.decay * -jnp.expm1(-t / self.warmup_steps)

  def update(self, ema_params: Any, params: Any, step: jax.Array) -> Any:
    """ema_t from ema_{t-1} (`ema_params`) and params_t (`params`, after update `step`)."""
    keep = self.decay_at(step)
    return jax.tree.map(lambda e, p: e + ((1 - keep) * (p - e)).astype(e.dtype),
                        ema_params, params)


def from_config(train: ml_collections.ConfigDict) -> EMA | None:
  """The EMA of `config.train` (ema_decay, ema_warmup_steps), or None when ema_decay is 0."""
  if not train.ema_decay:
    return None
  if not 0.0 < train.ema_decay < 1.0:
    raise ValueError(f"train.ema_decay must be in (0, 1) (0 turns the EMA off), got "
                     f"{train.ema_decay}; DiffusionDet uses 0.999.")
  if train.ema_warmup_steps < 0:
    raise ValueError(f"train.ema_warmup_steps must be >= 0, got {train.ema_warmup_steps}")
  return EMA(float(train.ema_decay), int(train.ema_warmup_steps))
