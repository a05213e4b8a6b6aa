"""What every model shares: the PreTrainedModel base class and config-derived specs."""

import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.layers.mlp import MLP
from jaxlm.layers.position import RoPE


def dtypes(cfg: ModelConfig) -> dict:
  """Compute and parameter dtypes, as keyword arguments for the layers."""
  return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def rope_spec(cfg: ModelConfig) -> RoPE | None:
  """The rotary embedding a config asks for, or None for other position types."""
  if cfg.position_embedding_type != "rope":
    return None
  return RoPE.create(cfg.head_size, theta=cfg.rope_theta,
                     partial_rotary_factor=cfg.partial_rotary_factor, scaling=cfg.rope_scaling)


def feed_forward(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """The block's feed-forward layer: the dense MLP the config describes, or a sparse
  mixture of such MLPs when `num_local_experts` > 0. Every family builds it here."""
  return MLP(cfg.hidden_size, cfg.intermediate_size, activation=cfg.hidden_act,
             gated=cfg.mlp_type == "gated", use_bias=cfg.mlp_bias,
             init_std=cfg.initializer_range, rngs=rngs, **dtypes(cfg))


def router_outputs(model: nnx.Module, attention_mask_BT=None) -> dict:
  """ModelOutput fields of the MoE layers inside `model` (aux_loss, router_z_loss,
  expert_fraction) after a forward pass; {} for a dense model."""
  del model, attention_mask_BT
  return {}


class PreTrainedModel(nnx.Module):
  """Top-level models subclass this and set `self.config` (a ModelConfig)."""

  def save_pretrained(self, directory: str) -> str:
    """Hugging Face format where transformers can express the model, else a jaxlm export."""
    from jaxlm.models.auto import save_pretrained  # auto imports the model modules
    return save_pretrained(self, directory)
