"""The dynamic head's hyper-parameters, as one frozen (hashable) record built from a config."""
import dataclasses

import ml_collections


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """Everything the dynamic head needs; field names follow `config.model` (see configs/).

  Defaults are the official R-50 / 100-proposal recipe.
  """
  num_classes: int = 80
  num_proposals: int = 100
  num_stages: int = 6
  hidden_dim: int = 256
  dim_feedforward: int = 2048
  num_heads: int = 8
  dim_dynamic: int = 64
  num_cls_layers: int = 1
  num_reg_layers: int = 3
  pooler_resolution: int = 7
  sampling_ratio: int = 2
  # RoIAlign's form (roi_align.IMPLS): "gather", "separable" or "auto" (separable on TPU,
  # gather elsewhere); the same values.
  roi_align_impl: str = "auto"
  # A box of this side (sqrt of its area, in input pixels) is pooled from P4 (detectron2's
  # canonical size); half as large from P3, and so on, clamped to P2..P5.
  canonical_box_size: float = 224.0
  dropout: float = 0.0
  prior_prob: float = 0.01
  # Compute dtype, "float32" or "bfloat16" (precision.py says what stays float32).
  dtype: str = "float32"
  # Research switches (the paper's ablations).
  interaction: str = "dynamic_conv"   # a key of interactions.INTERACTIONS (Table 8, Table 4)
  self_attention: bool = True         # Table 4
  feature_reuse: bool = True          # Table 3
  proposal_init: str = "image"        # image | center | grid | random (Table 5)

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict, **overrides) -> "HeadConfig":
    """Picks this record's fields out of `config.model`, ignoring the others; `overrides`
    (e.g. the dataset's num_classes) take precedence."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in model.items() if k in names}, **overrides})
