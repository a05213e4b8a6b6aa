"""What every model shares: the PreTrainedModel base class, config-derived specs, the
gradient barrier and remat wrapper around each block, and MoE router outputs."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig, Runtime
from jaxlm.errors import DataError
from jaxlm.layers.linear import materialize
from jaxlm.layers.moe import MoE, pop_router_stats, router_losses
from jaxlm.layers.position import ALiBi, RoPE
from jaxlm.params import path_name

# Logical axes of the residual stream [B, T, D] (sharding rules map them to the mesh).
RESIDUAL_AXES = ("batch", "length", "embed")


def dtypes(cfg: ModelConfig, rt: Runtime) -> dict:
  """Compute (runtime) and parameter (checkpoint) dtypes, as keyword arguments for the
  layers."""
  return dict(dtype=jnp.dtype(rt.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def rope_spec(cfg: ModelConfig, layer: int | None = None) -> RoPE | None:
  """The rotary embedding of decoder layer `layer` (None: the config-wide one), or None for
  other position types. With rope_local_base_freq, the sliding_attention layers of
  layer_types rotate with that base and no scaling (Gemma 3's local layers)."""
  if cfg.position_embedding_type != "rope":
    return None
  if (layer is not None and cfg.rope_local_base_freq is not None
      and cfg.layer_types[layer] == "sliding_attention"):
    return RoPE.create(cfg.head_size, theta=cfg.rope_local_base_freq,
                       partial_rotary_factor=cfg.partial_rotary_factor,
                       interleaved=cfg.rope_interleaved)
  return RoPE.create(cfg.head_size, theta=cfg.rope_theta,
                     partial_rotary_factor=cfg.partial_rotary_factor, scaling=cfg.rope_scaling,
                     interleaved=cfg.rope_interleaved,
                     max_position_embeddings=cfg.max_position_embeddings)


def alibi_spec(cfg: ModelConfig) -> ALiBi | None:
  """The ALiBi bias a config asks for (model.alibi_style), or None without ALiBi."""
  if cfg.position_embedding_type != "alibi":
    return None
  return ALiBi(cfg.num_attention_heads, cfg.alibi_style, cfg.head_size)


# model.remat: what a block keeps for the backward pass ("none": everything).
_REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots}


@jax.custom_vjp
def grad_barrier(x):
  """Identity whose cotangent is computed once and stored (linear.materialize): the
  residual stream's gradient is an elementwise chain (layer-norm backward plus sums)
  across all blocks, which XLA:CPU otherwise recomputed in every block, a fifth of a GPT
  step (docs/performance.md#xla-cpu-fusion-and-barriers)."""
  return x


def _grad_barrier_fwd(x):
  return x, None


def _grad_barrier_bwd(_, g):
  return (materialize(g),)


grad_barrier.defvjp(_grad_barrier_fwd, _grad_barrier_bwd)


def run_block(rt: Runtime, block: nnx.Module, x, *args, rngs=None, **kwargs):
  """block(x, *args, rngs=rngs, **kwargs), rematerialized as `rt.remat` says: "full"
  keeps only the block's inputs, "dots" keeps the matmul outputs and recomputes the rest
  (norms, activations, softmax) in the backward pass."""
  x = grad_barrier(x)
  if rt.remat == "none":
    return block(x, *args, rngs=rngs, **kwargs)

  def call(block, x, rngs, args, kwargs):
    return block(x, *args, rngs=rngs, **kwargs)

  return nnx.remat(call, policy=_REMAT_POLICIES[rt.remat])(block, x, rngs, args, kwargs)


def router_outputs(model: nnx.Module, attention_mask_BT=None) -> dict:
  """ModelOutput fields of the MoE layers inside `model` (aux_loss, router_z_loss,
  expert_fraction [L, E]; see jaxlm.layers.moe.router_losses) after a forward pass; {} for
  a dense model. Call it once per forward: it removes the statistics the layers kept.

  `attention_mask_BT` (1 = real token) keeps padding out of the statistics. It is one
  [B, T] mask for every layer, or a dict from a path prefix ("encoder", "decoder.layers")
  to the mask of the layers below it (encoder-decoder models, whose stacks see different
  lengths); a layer no prefix covers counts every token.
  """
  cfg = getattr(model, "config", None)
  if cfg is not None and not cfg.num_local_experts:
    return {}
  moes = [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, MoE)]
  popped = [(path, pop_router_stats(m)) for path, m in moes]  # all, even if a check fails
  layers = []
  for path, stats in popped:
    if stats is None:
      continue
    logits_NE, idx_NK = stats
    mask = _mask_for(path, attention_mask_BT)
    if mask is not None and mask.size != logits_NE.shape[0]:
      raise DataError(f"attention_mask has {mask.size} entries but the MoE layer at "
                      f"{path_name(path)} routed {logits_NE.shape[0]} tokens")
    layers.append((logits_NE, idx_NK, None if mask is None else mask.reshape(-1)))
  if not layers:
    return {}
  return router_losses(layers, moes[0][1].num_experts, moes[0][1].top_k)


def _mask_for(path, masks):
  if not isinstance(masks, dict):
    return masks
  name = path_name(path)
  hits = [p for p in masks if name == p or name.startswith(p + ".")]
  return masks[max(hits, key=len)] if hits else None


class PreTrainedModel(nnx.Module):
  """Top-level models subclass this and set `self.config` (a ModelConfig: what the model
  is) and `self.runtime` (a Runtime: how it runs)."""

  saver = None  # jaxlm.pretrained.save_pretrained, set by that module (it imports this one)

  def generate(self, input_ids, **kwargs):
    """jaxlm.generate(self, input_ids, ...) (jaxlm/generate/decode.py)."""
    from jaxlm.generate.decode import generate  # noqa: PLC0415 (generate needs no models)
    return generate(self, input_ids, **kwargs)

  def save_pretrained(self, directory: str) -> str:
    """Hugging Face format where transformers can express the model, else a jaxlm export
    (jaxlm.save_pretrained)."""
    return type(self).saver(self, directory)
