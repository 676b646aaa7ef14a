"""Sparse R-CNN: ResNet -> FPN -> dynamic head, from uint8 RGB images to per-stage predictions.

Variables: {"params": {"backbone", "fpn", "head"}, "batch_stats": {"backbone"}} (the frozen
batch-norm statistics live in "batch_stats" and are never updated).
"""
import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from sparse_rcnn_jax.backbone import ResNet
from sparse_rcnn_jax.dynamic_head import DynamicHead
from sparse_rcnn_jax.fpn import FPN
from sparse_rcnn_jax.head_config import HeadConfig

# ImageNet statistics of RGB pixels in 0..255 (SPEC.md section 1).
PIXEL_MEAN = (123.675, 116.280, 103.530)
PIXEL_STD = (58.395, 57.120, 57.375)


def normalize_images(images):
  """The one place where pixels are normalized: [B, H, W, 3] RGB 0..255 -> float32."""
  mean = jnp.asarray(PIXEL_MEAN, jnp.float32)
  std = jnp.asarray(PIXEL_STD, jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


class SparseRCNN(nn.Module):
  """The whole detector.

  Attributes:
    head: the dynamic head's configuration (its hidden_dim is also the FPN width, its dtype the
      compute dtype of the whole model: precision.py).
    depth, width, norm, freeze_at: the ResNet backbone (see backbone.ResNet).
    conv_impl: how the backbone's and FPN's convolutions are differentiated (conv.make_conv).
  """
  head: HeadConfig
  depth: int = 50
  width: int = 64
  norm: str = "frozen_bn"
  freeze_at: int = 2
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, images, image_whwh, deterministic: bool = True):
    """Runs the detector.

    Args:
      images: [B, H, W, 3] RGB, uint8 or float in 0..255, zero-padded bottom/right to
        multiples of 32.
      image_whwh: [B, 4] (w, h, w, h) of each unpadded image.
      deterministic: disables dropout.
    Returns:
      dict of "pred_logits" [S, B, N, C], "pred_boxes" [S, B, N, 4] absolute xyxy in input
      pixels, and "proposal_boxes" [B, N, 4] (see DynamicHead), all float32.
    """
    x = normalize_images(images)
    dtype = self.head.dtype
    features = ResNet(self.depth, self.width, self.norm, self.freeze_at, self.conv_impl, dtype,
                      name="backbone")(x)
    maps = FPN(self.head.hidden_dim, conv_impl=self.conv_impl, dtype=dtype, name="fpn")(features)
    return DynamicHead(self.head, name="head")(maps, image_whwh, deterministic)


def build_model(model: ml_collections.ConfigDict) -> SparseRCNN:
  """The detector described by `config.model` (see configs/)."""
  backbone = model.backbone
  return SparseRCNN(head=HeadConfig.from_config(model), depth=backbone.depth,
                    width=backbone.width, norm=backbone.norm, freeze_at=backbone.freeze_at,
                    conv_impl=model.conv_impl)
