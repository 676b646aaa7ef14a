"""The dynamic head's hyper-parameters, as one frozen (hashable) record built from a config."""
import dataclasses

import ml_collections


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """Everything the dynamic head needs; field names follow `config.model`, whose values (the
  official R-50 / 100-proposal recipe in configs/r50_100pro_3x.py) are the only defaults: build
  it with `from_config`.
  """
  num_classes: int
  num_proposals: int
  num_stages: int
  hidden_dim: int
  dim_feedforward: int
  num_heads: int
  dim_dynamic: int
  num_cls_layers: int
  num_reg_layers: int
  pooler_resolution: int
  sampling_ratio: int
  # RoIAlign's form (roi_align.IMPLS): "gather", "separable" or "auto" (separable on TPU,
  # gather elsewhere); the same values.
  roi_align_impl: str
  # A box of this side (sqrt of its area, in input pixels) is pooled from P4 (detectron2's
  # canonical size); half as large from P3, and so on, clamped to P2..P5.
  canonical_box_size: float
  dropout: float
  prior_prob: float
  # The head's compute dtype, "float32" or "bfloat16": config.model.dtype, the whole model's
  # (SparseRCNN.dtype), read from the same field (precision.py says what stays float32).
  dtype: str
  # Research switches (the paper's ablations).
  interaction: str      # a key of interactions.INTERACTIONS (Table 8, Table 4)
  self_attention: bool  # Table 4
  feature_reuse: bool   # Table 3
  proposal_init: str    # image | center | grid | random (Table 5)

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict, **overrides) -> "HeadConfig":
    """Picks this record's fields out of `config.model`, ignoring the others; `overrides`
    (e.g. the dataset's num_classes) take precedence.

    Raises:
      ValueError: naming the fields `config.model` lacks (a config not built on
        configs/r50_100pro_3x.py, or a run saved before a field existed).
    """
    names = [f.name for f in dataclasses.fields(cls)]
    fields = {**{k: v for k, v in model.items() if k in names}, **overrides}
    missing = [n for n in names if n not in fields]
    if missing:
      raise ValueError(f"config.model lacks {missing}: build configs on "
                       "configs/r50_100pro_3x.py, or set them (--config.model.NAME=...)")
    return cls(**fields)
