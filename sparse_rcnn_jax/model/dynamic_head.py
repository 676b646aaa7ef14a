"""The iterative dynamic head: learnable proposals refined by S stages (docs/model.md, 3-4).

Each stage pools RoI features for its input boxes, lets the proposals talk to each other
(self-attention), lets each proposal read its own RoI feature (an instance interaction,
see interactions.py), and predicts class logits and box deltas. Stages are not weight-tied;
the boxes are stop-gradient between stages and every stage's output is kept for deep
supervision. Layers compute in `cfg.dtype`; the prediction layers, box decoding and the boxes
between stages are float32 (precision.py). Intermediates are sown into the "intermediates"
collection (inspect them with `apply(..., mutable=["intermediates"])`): boxes_in,
level_assignments, roi_features, self_attn_out, interaction_out, obj_features, pred_logits,
pred_boxes per stage.
"""
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparse_rcnn_jax.model import box_ops
from sparse_rcnn_jax.model import interactions
from sparse_rcnn_jax.model import precision
from sparse_rcnn_jax.model.head_config import HeadConfig
from sparse_rcnn_jax.model.roi_align import multilevel_roi_align

xavier = interactions.xavier
dense = interactions.dense


def proposal_boxes_init(kind: str):
  """Initializer of the [N, 4] normalized cxcywh proposal boxes (paper Table 5).

  image: every box is the whole image (official). center: small boxes (w = h = 0.1) at the
  centre. grid: a ceil(sqrt(N))^2 grid of boxes tiling the image, row-major. random: centres
  and sizes drawn from N(0.5, 0.2^2), clipped to [0.01, 1].
  """
  def init(key, shape, dtype=jnp.float32):
    n = shape[0]
    if kind == "image":
      return jnp.tile(jnp.array([0.5, 0.5, 1.0, 1.0], dtype), (n, 1))
    if kind == "center":
      return jnp.tile(jnp.array([0.5, 0.5, 0.1, 0.1], dtype), (n, 1))
    if kind == "grid":
      g = math.ceil(math.sqrt(n))
      centers = (jnp.arange(g, dtype=dtype) + 0.5) / g
      cy, cx = jnp.meshgrid(centers, centers, indexing="ij")
      size = jnp.full((g * g,), 1.0 / g, dtype)
      return jnp.stack([cx.ravel(), cy.ravel(), size, size], axis=-1)[:n]
    if kind == "random":
      return jnp.clip(0.5 + 0.2 * jax.random.normal(key, shape, dtype), 0.01, 1.0)
    raise ValueError(f"Unknown proposal_init {kind!r}; choose image, center, grid or random.")
  return init


class HeadStage(nn.Module):
  """One head stage (official `RCNNHead`).

  Attributes:
    cfg: the head's configuration.
    levels: the pyramid level of each FPN map (see DynamicHead).
  """
  cfg: HeadConfig
  levels: tuple[int, ...] = (2, 3, 4, 5)

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], boxes, proposal_features,
               deterministic: bool = True):
    """Refines boxes once.

    Args:
      features: FPN maps P_l for l in `levels`, each [B, H_l, W_l, D].
      boxes: [B, N, 4] absolute xyxy input boxes.
      proposal_features: [B, N, D].
      deterministic: disables dropout.
    Returns:
      (logits [B, N, C] float32, boxes [B, N, 4] absolute xyxy float32, object features
      [B, N, D] in the compute dtype).
    """
    cfg = self.cfg
    batch, num, dim = proposal_features.shape
    dtype = precision.compute_dtype(cfg.dtype)
    layer_norm = lambda name: interactions.layer_norm(name, cfg.dtype)
    dropout = lambda x: nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    with jax.named_scope("roi_align"):   # names its operations in profiles
      roi, levels = multilevel_roi_align(features, boxes, levels=self.levels,
                                         output_size=cfg.pooler_resolution,
                                         sampling_ratio=cfg.sampling_ratio,
                                         canonical_box_size=cfg.canonical_box_size,
                                         impl=cfg.roi_align_impl)
    self.sow("intermediates", "boxes_in", boxes)
    self.sow("intermediates", "level_assignments", levels)
    self.sow("intermediates", "roi_features", roi)

    x = proposal_features.astype(dtype)
    if cfg.self_attention:
      attn = nn.MultiHeadDotProductAttention(
          num_heads=cfg.num_heads, qkv_features=dim, out_features=dim, kernel_init=xavier,
          dropout_rate=cfg.dropout, deterministic=deterministic, dtype=dtype,
          force_fp32_for_softmax=True, name="self_attn")(x, x, x)
      self.sow("intermediates", "self_attn_out", attn)
      x = layer_norm("norm1")(x + dropout(attn))

    interaction = interactions.batched(interactions.get_interaction(cfg.interaction))
    inter = interaction(cfg, name="inst_interact")(
        x.reshape(batch * num, dim), roi.reshape(batch * num, -1, dim)).reshape(batch, num, dim)
    self.sow("intermediates", "interaction_out", inter)
    x = layer_norm("norm2")(x + dropout(inter))

    ffn = dense(cfg.dim_feedforward, cfg.dtype, name="linear1")(x)
    ffn = dense(dim, cfg.dtype, name="linear2")(dropout(nn.relu(ffn)))
    obj = layer_norm("norm3")(x + dropout(ffn))
    self.sow("intermediates", "obj_features", obj)

    cls = obj
    for i in range(cfg.num_cls_layers):
      cls = dense(dim, cfg.dtype, use_bias=False, name=f"cls_fc{i}")(cls)
      cls = nn.relu(layer_norm(f"cls_norm{i}")(cls))
    reg = obj
    for i in range(cfg.num_reg_layers):
      reg = dense(dim, cfg.dtype, use_bias=False, name=f"reg_fc{i}")(reg)
      reg = nn.relu(layer_norm(f"reg_norm{i}")(reg))
    prior_bias = -math.log((1 - cfg.prior_prob) / cfg.prior_prob)
    # The prediction layers in float32: cheap, and logits near the prior (-4.6) or deltas
    # rounded to 8 bits would move the loss and the boxes.
    logits = dense(cfg.num_classes, "float32", bias_init=nn.initializers.constant(prior_bias),
                   name="class_logits")(cls.astype(jnp.float32))
    deltas = dense(4, "float32", name="bboxes_delta")(reg.astype(jnp.float32))
    pred_boxes = box_ops.apply_deltas(deltas, boxes)
    self.sow("intermediates", "pred_logits", logits)
    self.sow("intermediates", "pred_boxes", pred_boxes)
    return logits, pred_boxes, obj


class DynamicHead(nn.Module):
  """Learnable proposals and S refinement stages (official `DynamicHead` plus the proposals).

  Attributes:
    cfg: the head's configuration.
    levels: the pyramid level of each FPN map, consecutive, fine to coarse (level l has stride
      2**l), for RoIAlign. The detector passes its backbone's levels; the default, P2..P5, is
      for direct callers.
  """
  cfg: HeadConfig
  levels: tuple[int, ...] = (2, 3, 4, 5)

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], image_whwh, deterministic: bool = True,
               num_stages: int | None = None):
    """Detects objects on FPN maps.

    Args:
      features: FPN maps P_l for l in `levels`, each [B, H_l, W_l, D] (NHWC), stride 2**l.
      image_whwh: [B, 4] (w, h, w, h) of each unpadded image, in input pixels.
      deterministic: disables dropout.
      num_stages: run only the first S of the cfg.num_stages stages (early exit: each stage
        depends only on the ones before it); None: all of them.
    Returns:
      dict with "pred_logits" [S, B, N, C] (sigmoid class logits of every stage run) and
      "pred_boxes" [S, B, N, 4] (absolute xyxy in input pixels), and "proposal_boxes"
      [B, N, 4], the learned proposals as absolute xyxy (the input to stage 0).
    """
    cfg = self.cfg
    batch = image_whwh.shape[0]
    init_boxes = self.param("proposal_boxes", proposal_boxes_init(cfg.proposal_init),
                            (cfg.num_proposals, 4))
    init_features = self.param("proposal_features", nn.initializers.normal(1.0),
                               (cfg.num_proposals, cfg.hidden_dim))
    proposal_boxes = box_ops.cxcywh_to_xyxy(init_boxes)[None] * image_whwh[:, None, :]
    init_features = jnp.broadcast_to(init_features[None], (batch,) + init_features.shape)

    boxes, feats = proposal_boxes, init_features
    all_logits, all_boxes = [], []
    for i in range(cfg.num_stages if num_stages is None else num_stages):
      logits, pred_boxes, obj = HeadStage(cfg, self.levels, name=f"stage{i}")(features, boxes,
                                                                          feats, deterministic)
      all_logits.append(logits)
      all_boxes.append(pred_boxes)
      feats = obj if cfg.feature_reuse else init_features
      boxes = jax.lax.stop_gradient(pred_boxes)
    return {"pred_logits": jnp.stack(all_logits), "pred_boxes": jnp.stack(all_boxes),
            "proposal_boxes": proposal_boxes}
