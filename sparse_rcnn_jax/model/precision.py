"""The compute dtype of the model (`config.model.dtype`) and what stays float32 whatever it is.

"float32" (the default) computes everything in float32. "bfloat16" runs the backbone, the FPN
and the head's layers (convolutions, dense layers, attention, the dynamic convolution's
products, RoIAlign's feature reads) in bfloat16, which halves activation memory and uses the
matrix units of current GPUs and TPUs at full rate. bfloat16 keeps float32's exponent range,
so nothing overflows and no loss scaling is needed (unlike float16, where Sparse R-CNN's focal
loss and box deltas are known to produce NaN); it keeps 8 significant bits.

Kept in float32 for accuracy, because they are cheap or because rounding them would move boxes:
  * parameters (cast to the compute dtype where used, so gradients and the optimizer state are
    float32) and the frozen batch-norm statistics (the affine is applied in float32);
  * the statistics of group and layer norms (flax computes them in float32) and the softmax of
    attention;
  * pixel normalization, RoIAlign's sample coordinates, bilinear weights and their weighted sum;
  * the last layer of each prediction branch (class logits, box deltas), box decoding and the
    boxes passed from stage to stage; the model returns float32 logits and boxes, so the
    matching costs and every loss are computed in float32.
"""
import jax.numpy as jnp

DTYPES = ("float32", "bfloat16")


def compute_dtype(name: str) -> jnp.dtype:
  """The dtype named by `config.model.dtype`."""
  if name not in DTYPES:
    raise ValueError(f"model.dtype must be one of {DTYPES}, got {name!r}.")
  return jnp.dtype(name)
