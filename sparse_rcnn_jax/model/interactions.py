"""Instance interactions: how one proposal feature reads its own RoI feature.

Each interaction is a linen module written for ONE proposal,

    __call__(proposal_feature: [D], roi_feature: [R*R, D]) -> [D],

and the head vmaps it over all B*N proposals (parameters shared). To try a new interaction,
write one such module and add it to `INTERACTIONS`; `config.model.interaction` selects it by
name, with no other change. Layers compute in `cfg.dtype` (parameters float32).
"""
import flax.linen as nn

from sparse_rcnn_jax.model import precision
from sparse_rcnn_jax.model.head_config import HeadConfig

xavier = nn.initializers.xavier_uniform()


def layer_norm(name: str, dtype: str = "float32") -> nn.LayerNorm:
  """PyTorch's LayerNorm (eps 1e-5; Flax's default is 1e-6); output in `dtype`, statistics in
  float32."""
  return nn.LayerNorm(epsilon=1e-5, dtype=precision.compute_dtype(dtype), name=name)


def dense(features: int, dtype: str, **kwargs) -> nn.Dense:
  """A dense layer with xavier-uniform weights, computed in `dtype`."""
  return nn.Dense(features, kernel_init=xavier, dtype=precision.compute_dtype(dtype), **kwargs)


class DynamicConv(nn.Module):
  """The paper's dynamic instance interaction (official `DynamicConv`).

  The proposal feature generates two matrices P1 [D, Dd] and P2 [Dd, D]; the RoI feature is
  multiplied by P1 then P2 (each followed by LayerNorm + ReLU), flattened spatial-major and
  projected back to D.
  """
  cfg: HeadConfig

  @nn.compact
  def __call__(self, proposal_feature, roi_feature):
    d, dd, dtype = self.cfg.hidden_dim, self.cfg.dim_dynamic, self.cfg.dtype
    params = dense(2 * d * dd, dtype, name="dynamic_layer")(proposal_feature)
    param1 = params[:d * dd].reshape(d, dd)
    param2 = params[d * dd:].reshape(dd, d)
    roi_feature = roi_feature.astype(params.dtype)
    x = nn.relu(layer_norm("norm1", dtype)(roi_feature @ param1))
    x = nn.relu(layer_norm("norm2", dtype)(x @ param2))
    x = dense(d, dtype, name="out_layer")(x.reshape(-1))
    return nn.relu(layer_norm("norm3", dtype)(x))


class RoIAttention(nn.Module):
  """Multi-head attention from the proposal feature (query) to its RoI feature (Table 8)."""
  cfg: HeadConfig

  @nn.compact
  def __call__(self, proposal_feature, roi_feature):
    d = self.cfg.hidden_dim
    out = nn.MultiHeadDotProductAttention(
        num_heads=self.cfg.num_heads, qkv_features=d, out_features=d, kernel_init=xavier,
        deterministic=True, dtype=precision.compute_dtype(self.cfg.dtype),
        force_fp32_for_softmax=True, name="attention")(proposal_feature[None], roi_feature)
    return out[0]


class StaticInteraction(nn.Module):
  """No instance interaction (Table 4): the RoI feature alone through a static FC layer."""
  cfg: HeadConfig

  @nn.compact
  def __call__(self, proposal_feature, roi_feature):
    del proposal_feature
    x = dense(self.cfg.hidden_dim, self.cfg.dtype, name="out_layer")(roi_feature.reshape(-1))
    return nn.relu(layer_norm("norm3", self.cfg.dtype)(x))


INTERACTIONS = {
    "dynamic_conv": DynamicConv,
    "attention": RoIAttention,
    "static": StaticInteraction,
}


def get_interaction(name: str) -> type[nn.Module]:
  if name not in INTERACTIONS:
    raise ValueError(f"Unknown interaction {name!r}; choose one of {sorted(INTERACTIONS)}.")
  return INTERACTIONS[name]


def batched(interaction: type[nn.Module]) -> type[nn.Module]:
  """The per-proposal interaction vmapped over a leading proposal axis, parameters shared."""
  return nn.vmap(interaction, in_axes=0, out_axes=0, variable_axes={"params": None},
                 split_rngs={"params": False, "dropout": True})

