"""Feature pyramid network (Lin et al. 2017), exactly detectron2's FPN as Sparse R-CNN uses it.

1x1 lateral convs and 3x3 output convs, both with bias and no norm; the top-down path upsamples
by nearest x2 and sums. No P6: the official code builds one but never uses it. Submodule names
are detectron2's (`fpn_lateral2`, `fpn_output2`, ...).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from sparse_rcnn_jax.model import precision
from sparse_rcnn_jax.model.conv import Conv

# detectron2's c2_xavier_fill: kaiming_uniform with a=1, i.e. U(+-sqrt(3 / fan_in)); bias 0.
_c2_xavier_fill = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def _upsample_nearest_2x(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, 2H, 2W, C], each pixel repeated (F.interpolate(mode="nearest"))."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class FPN(nn.Module):
  """Top-down pyramid over a backbone's features.

  Attributes:
    out_channels: channels of every pyramid level (256 in the paper).
    in_levels: backbone levels used, consecutive, from fine to coarse; level l reads
      features[l] (stride 2**l) and gives P_l. The detector passes its backbone's `levels`;
      the default is the ResNet's, for direct callers.
    conv_impl: how convolutions are differentiated (conv.make_conv).
    dtype: the compute dtype (precision.py); parameters stay float32.
  """
  out_channels: int = 256
  in_levels: tuple[int, ...] = (2, 3, 4, 5)
  conv_impl: str = "auto"
  dtype: str = "float32"

  @nn.compact
  def __call__(self, features: dict[int, jax.Array]) -> list[jax.Array]:
    """features: {level l: [B, H/2**l, W/2**l, C_l]} for every l in `in_levels`, NHWC.

    Returns:
      [P_l for l in in_levels] (P2..P5 by default), each [B, H/2**l, W/2**l, out_channels] in
      `dtype`. Each level must be exactly twice the size of the next coarser one, i.e. the image
      height and width multiples of 2**in_levels[-1].
    """
    missing = [level for level in self.in_levels if level not in features]
    if missing:
      raise ValueError(f"FPN over levels {self.in_levels}, but the backbone returned levels "
                       f"{sorted(features)}.")
    def conv(kernel_size: int, name: str) -> Conv:
      return Conv(self.out_channels, kernel_size, kernel_init=_c2_xavier_fill,
                  impl=self.conv_impl, dtype=precision.compute_dtype(self.dtype), name=name)

    outputs = []
    top_down = None
    for level in reversed(self.in_levels):
      lateral = conv(1, f"fpn_lateral{level}")(features[level])
      if top_down is not None:
        upsampled = _upsample_nearest_2x(top_down)
        if upsampled.shape != lateral.shape:
          raise ValueError(
              f"FPN: level {level} has spatial size {lateral.shape[1:3]}, but twice the coarser "
              f"level is {upsampled.shape[1:3]}; pad images to multiples of "
              f"{2**self.in_levels[-1]}.")
        lateral = lateral + upsampled
      top_down = lateral
      outputs.append(conv(3, f"fpn_output{level}")(lateral))
    return outputs[::-1]
