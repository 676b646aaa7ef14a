"""Official Sparse R-CNN checkpoints <-> our parameters.

The official state dict uses PyTorch layouts (Linear weight [out, in], Conv [O, I, kH, kW]).
Official name -> our path in `params` (docs/model.md, section 8, lists a whole checkpoint):
  backbone.bottom_up.*                      -> backbone/...  (backbones/resnet.py)
  backbone.fpn_{lateral,output}{l}.*        -> fpn/fpn_{lateral,output}{l}  (convert/fpn.py)
  init_proposal_boxes.weight [N, 4]         -> head/proposal_boxes (normalized cxcywh)
  init_proposal_features.weight [N, D]      -> head/proposal_features
and, per stage i, `head.head_series.{i}.X` -> head/stage{i}/Y with X -> Y:
  self_attn.in_proj_{weight,bias} [3D, D], [3D] (q, k, v stacked) -> self_attn/{query,key,value}
  self_attn.out_proj.*                      -> self_attn/out
  inst_interact.dynamic_layer [2 * D * dim_dynamic, D], inst_interact.out_layer
    [D, R * R * D], inst_interact.norm{1,2,3}                -> the same names
  linear1, linear2, norm1, norm2, norm3, class_logits, bboxes_delta -> the same names
  cls_module.{3k}.weight, cls_module.{3k+1}.* -> cls_fc{k} (Linear, no bias), cls_norm{k}
  reg_module.{3k}.weight, reg_module.{3k+1}.* -> reg_fc{k} (Linear, no bias), reg_norm{k}
A Linear's `weight` is our `kernel` transposed; a LayerNorm's `weight` is our `scale`. Our
variables are `{"params": {"backbone", "fpn", "head"}, "batch_stats": {"backbone"}}`. Every
conversion is a pure reshaping/transposition, so a round trip is exact. `architecture_of`
reads the head and ResNet depth a checkpoint was trained with from its names and shapes, so a
checkpoint made for another config converts too (model.init_from then keeps what fits).
"""
import dataclasses
import math
import re

import numpy as np
from flax import traverse_util

from sparse_rcnn_jax.convert import fpn as fpn_convert
from sparse_rcnn_jax.model.backbones import resnet
from sparse_rcnn_jax.model.head_config import HeadConfig


def _stage_linear_names(cfg: HeadConfig) -> list[tuple[str, tuple[str, ...], bool]]:
  """(official module name, our module path, has bias) of every Linear in one stage."""
  names = [("linear1", ("linear1",), True), ("linear2", ("linear2",), True),
           ("class_logits", ("class_logits",), True), ("bboxes_delta", ("bboxes_delta",), True)]
  names += [(f"cls_module.{3 * i}", (f"cls_fc{i}",), False) for i in range(cfg.num_cls_layers)]
  names += [(f"reg_module.{3 * i}", (f"reg_fc{i}",), False) for i in range(cfg.num_reg_layers)]
  if cfg.interaction in ("dynamic_conv", "static"):
    names.append(("inst_interact.out_layer", ("inst_interact", "out_layer"), True))
  if cfg.interaction == "dynamic_conv":
    names.append(("inst_interact.dynamic_layer", ("inst_interact", "dynamic_layer"), True))
  return names


def _stage_norm_names(cfg: HeadConfig) -> list[tuple[str, tuple[str, ...]]]:
  """(official LayerNorm name, our path) of every LayerNorm in one stage."""
  names = [("norm2", ("norm2",)), ("norm3", ("norm3",))]
  if cfg.self_attention:
    names.append(("norm1", ("norm1",)))
  names += [(f"cls_module.{3 * i + 1}", (f"cls_norm{i}",)) for i in range(cfg.num_cls_layers)]
  names += [(f"reg_module.{3 * i + 1}", (f"reg_norm{i}",)) for i in range(cfg.num_reg_layers)]
  if cfg.interaction in ("dynamic_conv", "static"):
    names.append(("inst_interact.norm3", ("inst_interact", "norm3")))
  if cfg.interaction == "dynamic_conv":
    names += [("inst_interact.norm1", ("inst_interact", "norm1")),
              ("inst_interact.norm2", ("inst_interact", "norm2"))]
  return names


def _attention_to_ours(in_w, in_b, out_w, out_b, num_heads):
  """torch nn.MultiheadAttention tensors -> flax MultiHeadDotProductAttention params."""
  dim = out_w.shape[0]
  head_dim = dim // num_heads
  params = {}
  for name, w, b in zip(("query", "key", "value"), np.split(in_w, 3), np.split(in_b, 3)):
    params[name] = {"kernel": w.T.reshape(dim, num_heads, head_dim),
                    "bias": b.reshape(num_heads, head_dim)}
  params["out"] = {"kernel": out_w.T.reshape(num_heads, head_dim, dim), "bias": out_b}
  return params


def _attention_to_official(params):
  dim = params["out"]["bias"].shape[0]
  in_w = np.concatenate([params[n]["kernel"].reshape(dim, dim).T
                         for n in ("query", "key", "value")])
  in_b = np.concatenate([params[n]["bias"].reshape(dim) for n in ("query", "key", "value")])
  return in_w, in_b, params["out"]["kernel"].reshape(dim, dim).T, params["out"]["bias"]


def head_from_official(state: dict[str, np.ndarray], cfg: HeadConfig) -> dict:
  """Official `init_proposal_*` and `head.head_series.*` tensors -> our `params["head"]`.

  Raises ValueError listing missing names or mismatched shapes.
  """
  if cfg.interaction == "attention":
    raise ValueError("The official code has no multi-head-attention interaction to convert.")
  flat, used = {}, set()

  def take(name, shape=None):
    if name not in state:
      raise ValueError(f"Official checkpoint lacks {name!r} (config: {cfg})")
    used.add(name)
    value = np.asarray(state[name])
    if shape is not None and value.shape != shape:
      raise ValueError(f"{name}: expected shape {shape}, found {value.shape}")
    return value

  d = cfg.hidden_dim
  flat[("proposal_boxes",)] = take("init_proposal_boxes.weight", (cfg.num_proposals, 4))
  flat[("proposal_features",)] = take("init_proposal_features.weight", (cfg.num_proposals, d))
  for i in range(cfg.num_stages):
    prefix, ours = f"head.head_series.{i}.", (f"stage{i}",)
    for name, path, has_bias in _stage_linear_names(cfg):
      flat[ours + path + ("kernel",)] = take(prefix + name + ".weight").T
      if has_bias:
        flat[ours + path + ("bias",)] = take(prefix + name + ".bias")
    for name, path in _stage_norm_names(cfg):
      flat[ours + path + ("scale",)] = take(prefix + name + ".weight")
      flat[ours + path + ("bias",)] = take(prefix + name + ".bias")
    if cfg.self_attention:
      attn = _attention_to_ours(
          *(take(prefix + "self_attn." + n) for n in
            ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")),
          num_heads=cfg.num_heads)
      for path, value in traverse_util.flatten_dict(attn).items():
        flat[ours + ("self_attn",) + path] = value
  unexpected = sorted(k for k in state if k.startswith(("head.", "init_proposal_"))
                      and k not in used)
  if unexpected:
    raise ValueError(f"Official checkpoint has head tensors this config does not use "
                     f"(check num_stages, num_cls_layers, ...): {unexpected[:10]}")
  return traverse_util.unflatten_dict(flat)


def head_to_official(head: dict, cfg: HeadConfig) -> dict[str, np.ndarray]:
  """Our `params["head"]` -> official names and layouts (inverse of head_from_official)."""
  head = traverse_util.flatten_dict(_to_numpy(head))
  state = {"init_proposal_boxes.weight": head[("proposal_boxes",)],
           "init_proposal_features.weight": head[("proposal_features",)]}
  for i in range(cfg.num_stages):
    prefix, ours = f"head.head_series.{i}.", (f"stage{i}",)
    for name, path, has_bias in _stage_linear_names(cfg):
      state[prefix + name + ".weight"] = head[ours + path + ("kernel",)].T
      if has_bias:
        state[prefix + name + ".bias"] = head[ours + path + ("bias",)]
    for name, path in _stage_norm_names(cfg):
      state[prefix + name + ".weight"] = head[ours + path + ("scale",)]
      state[prefix + name + ".bias"] = head[ours + path + ("bias",)]
    if cfg.self_attention:
      attn = traverse_util.unflatten_dict(
          {k[2:]: v for k, v in head.items() if k[:2] == (f"stage{i}", "self_attn")})
      for n, v in zip(("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"),
                      _attention_to_official(attn)):
        state[prefix + "self_attn." + n] = v
  return state


def _to_numpy(tree):
  return {k: _to_numpy(v) if isinstance(v, dict) else np.asarray(v) for k, v in tree.items()}


def _strip(state: dict, prefix: str) -> dict:
  return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def from_official(state: dict[str, np.ndarray], cfg: HeadConfig, depth: int) -> dict:
  """A whole official checkpoint -> our variables {"params", "batch_stats"}.

  Args:
    state: official state dict (e.g. from checkpoint_io.load_state_dict).
    cfg: the head's configuration (must match the checkpoint's).
    depth: ResNet depth of the checkpoint's backbone (50 or 101).
  """
  bottom_up = _strip(state, "backbone.bottom_up.")
  backbone, stats = resnet.resnet_from_detectron2(bottom_up, depth)
  fpn = fpn_convert.fpn_from_detectron2(
      {k: v for k, v in _strip(state, "backbone.").items() if k.startswith("fpn_")})
  return {"params": {"backbone": backbone, "fpn": fpn, "head": head_from_official(state, cfg)},
          "batch_stats": {"backbone": stats}}


def to_official(variables: dict, cfg: HeadConfig, depth: int) -> dict[str, np.ndarray]:
  """Our variables -> an official state dict (inverse of from_official)."""
  params = _to_numpy(variables["params"])
  stats = _to_numpy(variables["batch_stats"])
  state = {"backbone.bottom_up." + k: v for k, v in resnet.resnet_to_detectron2(
      params["backbone"], stats["backbone"], depth).items()}
  state.update({"backbone." + k: v
                for k, v in fpn_convert.fpn_to_detectron2(params["fpn"]).items()})
  state.update(head_to_official(params["head"], cfg))
  return state


def _resnet_depth(state: dict[str, np.ndarray]) -> int:
  """The depth of the ResNet under `backbone.bottom_up.`: the one whose convs
  (`res{s}.{j}.{conv}`, resnet_spec) are exactly the checkpoint's."""
  pattern = re.compile(r"backbone\.bottom_up\.(res\d\.\d+\.\w+)\.weight")
  found = {m[1] for m in map(pattern.fullmatch, state) if m}
  for depth in resnet.STAGE_BLOCKS:
    spec = resnet.resnet_spec(depth)
    convs = {f"{stage}.{j}.{conv.name}" for stage, blocks in spec.stages.items()
             for j, block in enumerate(blocks)
             for conv in block.convs + ((block.shortcut,) if block.shortcut else ())}
    if convs == found:
      return depth
  raise ValueError(f"The checkpoint's backbone.bottom_up.res* convs ({len(found)} of them) are "
                   f"those of no ResNet of depth {sorted(resnet.STAGE_BLOCKS)}.")


def architecture_of(state: dict[str, np.ndarray], like: HeadConfig) -> tuple[HeadConfig, int]:
  """(head config, ResNet depth) an official checkpoint was trained with, read from its tensor
  names and shapes. The head fields no tensor shows (num_heads, dropout, prior_prob,
  proposal_init, dtype, ...) are `like`'s.

  Raises ValueError naming what is missing when `state` is not a Sparse R-CNN checkpoint.
  """
  def shape(name: str) -> tuple[int, ...]:
    if name not in state:
      raise ValueError(f"Not an official Sparse R-CNN checkpoint: it lacks {name!r}.")
    return np.shape(state[name])

  def count(module: str) -> int:
    """Linears of `cls_module` / `reg_module` in stage 0 (each is Linear, LayerNorm, ReLU)."""
    pattern = re.compile(rf"head\.head_series\.0\.{module}\.(\d+)\.weight")
    return sum(1 for m in map(pattern.fullmatch, state) if m and int(m[1]) % 3 == 0)

  num_proposals, d = shape("init_proposal_features.weight")
  stages = {int(m[1]) for m in map(re.compile(r"head\.head_series\.(\d+)\.").match, state) if m}
  stage = "head.head_series.0."
  fields = dict(num_proposals=num_proposals, hidden_dim=d, num_stages=len(stages),
                num_classes=shape(stage + "class_logits.weight")[0],
                dim_feedforward=shape(stage + "linear1.weight")[0],
                num_cls_layers=count("cls_module"), num_reg_layers=count("reg_module"),
                self_attention=stage + "self_attn.in_proj_weight" in state)
  if stage + "inst_interact.out_layer.weight" in state:
    fields["pooler_resolution"] = math.isqrt(shape(stage + "inst_interact.out_layer.weight")[1]
                                             // d)
    fields["interaction"] = "static"
  if stage + "inst_interact.dynamic_layer.weight" in state:
    fields["dim_dynamic"] = shape(stage + "inst_interact.dynamic_layer.weight")[0] // (2 * d)
    fields["interaction"] = "dynamic_conv"
  return dataclasses.replace(like, **fields), _resnet_depth(state)

