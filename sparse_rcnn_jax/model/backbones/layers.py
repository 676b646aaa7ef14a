"""Pieces every backbone shares: the norm after a convolution and its name-table entries.

A pretrained backbone keeps its batch norms frozen (statistics and affine fixed, in the
"batch_stats" collection, never trained); one trained from scratch uses group norm instead.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparse_rcnn_jax.convert.name_table import Entry
from sparse_rcnn_jax.model import precision

NORMS = ("frozen_bn", "group_norm")
# Names of the frozen batch norm's values in the "batch_stats" collection (PyTorch's names).
BATCH_NORM_STATS = ("weight", "bias", "running_mean", "running_var")


class FrozenBatchNorm(nn.Module):
  """Batch norm with fixed statistics and affine: y = x * scale + shift over the last axis.

  All four values live in the "batch_stats" collection, not in "params", so they are never
  trained; they start as the identity (weight 1, bias 0, mean 0, var 1). They stay float32 and
  the affine is applied in float32; the output has the input's dtype. `eps` is the one the
  weights were trained with (PyTorch's 1e-5; TensorFlow models such as EfficientNet use 1e-3).
  """
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., C] -> [..., C]."""
    channels = x.shape[-1]
    init = {"weight": jnp.ones, "bias": jnp.zeros, "running_mean": jnp.zeros,
            "running_var": jnp.ones}
    stats = {name: self.variable("batch_stats", name, init[name], (channels,), jnp.float32).value
             for name in BATCH_NORM_STATS}
    scale = stats["weight"] * jax.lax.rsqrt(stats["running_var"] + self.eps)
    shift = stats["bias"] - stats["running_mean"] * scale
    return (x.astype(jnp.float32) * scale + shift).astype(x.dtype)


def make_norm(kind: str, channels: int, dtype: str = "float32", eps: float = 1e-5) -> nn.Module:
  """The norm after each conv, named "norm" like detectron2's `conv.norm`.

  group_norm (trainable, for training from scratch) uses 32 groups, or the largest divisor of
  32 that divides `channels` when there are fewer channels (tiny test networks); its output is
  in `dtype` (statistics in float32). `eps` is the frozen batch norm's.
  """
  if kind == "frozen_bn":
    return FrozenBatchNorm(eps=eps, name="norm")
  if kind == "group_norm":
    return nn.GroupNorm(num_groups=math.gcd(32, channels), epsilon=1e-5,
                        dtype=precision.compute_dtype(dtype), name="norm")
  raise ValueError(f"norm must be one of {NORMS}, got {kind!r}.")


def conv_norm_entries(weight: str, norm: str, path: tuple[str, ...],
                      shape: tuple[int, ...]) -> dict[str, Entry]:
  """Name-table entries of one bias-free conv and its batch norm: PyTorch's `weight` (shape
  [O, I / groups, kH, kW]) -> params path/kernel, and `norm`.{weight, bias, running_mean,
  running_var} -> batch_stats path/norm/...; the norm's `num_batches_tracked` counter (a
  training-time count) is known and left unused."""
  entries = {weight: Entry(("params", *path, "kernel"), shape)}
  for stat in BATCH_NORM_STATS:
    entries[f"{norm}.{stat}"] = Entry(("batch_stats", *path, "norm", stat), (shape[0],))
  entries[f"{norm}.num_batches_tracked"] = Entry(None, ())
  return entries
