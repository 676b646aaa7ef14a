"""Sparse R-CNN: backbone -> FPN -> dynamic head, from uint8 RGB images to per-stage predictions.

The backbone (chosen by name, backbones/) declares its pyramid levels, on which the FPN and the
head's RoIAlign work, and the pixel statistics its weights expect. Variables: {"params":
{"backbone", "fpn", "head"}, "batch_stats": {"backbone"}} (a backbone's frozen batch-norm statistics live in "batch_stats"
and are never updated).
"""
import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from sparse_rcnn_jax.model import backbones
from sparse_rcnn_jax.model.dynamic_head import DynamicHead
from sparse_rcnn_jax.model.fpn import FPN
from sparse_rcnn_jax.model.head_config import HeadConfig


def normalize_images(images, mean: tuple[float, float, float], std: tuple[float, float, float]):
  """The one place where pixels are normalized: [B, H, W, 3] RGB 0..255 -> float32, with the
  backbone's statistics (`pixel_mean`, `pixel_std`)."""
  return ((images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32))
          / jnp.asarray(std, jnp.float32))


class SparseRCNN(nn.Module):
  """The whole detector.

  Attributes:
    head: the dynamic head's configuration (its hidden_dim is also the FPN width).
    backbone: a backbone module (backbones/), built in `dtype`; its `levels` are the pyramid's.
    dtype: the compute dtype of the whole model, "float32" or "bfloat16" (config.model.dtype;
      precision.py says what stays float32); the backbone and the head are built with it.
    conv_impl: how the FPN's convolutions are differentiated (conv.make_conv).
    eval_stages: 0, or k: inference (deterministic calls) runs the head's first k stages only
      and returns their predictions, which are exactly those stages' predictions of the whole
      head (config.model.eval_stages; the paper's Table 7 from one model). Training and
      initialization always run every stage.
  """
  head: HeadConfig
  backbone: backbones.Backbone
  dtype: str
  conv_impl: str = "auto"
  eval_stages: int = 0

  def is_frozen(self, path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` in the "params" collection is frozen (the optimizer's
    mask): only the backbone freezes parameters, as its config says."""
    return path[0] == "backbone" and self.backbone.is_frozen(path[1:])

  @nn.compact
  def __call__(self, images, image_whwh, deterministic: bool = True):
    """Runs the detector.

    Args:
      images: [B, H, W, 3] RGB, uint8 or float in 0..255, zero-padded bottom/right to
        multiples of the backbone's `size_divisibility` (32 for every backbone here).
      image_whwh: [B, 4] (w, h, w, h) of each unpadded image.
      deterministic: disables dropout.
    Returns:
      dict of "pred_logits" [S, B, N, C], "pred_boxes" [S, B, N, 4] absolute xyxy in input
      pixels, and "proposal_boxes" [B, N, 4] (see DynamicHead), all float32; S is the head's
      number of stages, or `eval_stages` when set and `deterministic`.
    """
    x = normalize_images(images, self.backbone.pixel_mean, self.backbone.pixel_std)
    levels = self.backbone.levels
    features = self.backbone(x)
    maps = FPN(self.head.hidden_dim, levels, conv_impl=self.conv_impl, dtype=self.dtype,
               name="fpn")(features)
    early_exit = self.eval_stages and deterministic and not self.is_initializing()
    return DynamicHead(self.head, levels, name="head")(
        maps, image_whwh, deterministic, self.eval_stages if early_exit else None)


def build_model(model: ml_collections.ConfigDict, num_classes: int | None = None) -> SparseRCNN:
  """The detector described by `config.model` (see configs/) for `num_classes` classes: the
  dataset's (DatasetInfo.num_classes); `model.num_classes` only where there is no dataset
  (benchmarks and tests on random data)."""
  head = HeadConfig.from_config(model, **({} if num_classes is None else
                                          {"num_classes": num_classes}))
  eval_stages = model.get("eval_stages", 0)  # runs saved before the field: every stage
  if not 0 <= eval_stages <= head.num_stages:
    raise ValueError(f"model.eval_stages={eval_stages}: choose 1..{head.num_stages} (the "
                     "head's num_stages) to stop inference after that stage, or 0 for all.")
  backbone = backbones.build_backbone(model.backbone, dtype=model.dtype, conv_impl=model.conv_impl)
  return SparseRCNN(head=head, backbone=backbone, dtype=model.dtype, conv_impl=model.conv_impl,
                    eval_stages=eval_stages)
