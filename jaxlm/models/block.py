"""The one transformer block every family composes, and the factories that build its parts.

  post-LN (BERT):              x = norm1(x + attn x);  x = norm2(x + ff x)
  pre-LN (GPT, Llama, T5):     x = x + attn(norm1 x);  [x = x + cross(norm x, enc)];
                               x = x + ff(norm2 x)
  parallel (GPT-NeoX):         x = x + attn(norm1 x) + ff(norm2 x)
  parallel, one norm (Falcon, Cohere: parallel_shared_norm):  h = norm1 x;  x = x + attn h + ff h
  sandwich (Gemma 2):          x = x + norm1'(attn(norm1 x));  x = x + norm2'(ff(norm2 x))

`attention(cfg, rt)`, `norm(cfg)` and `feed_forward(cfg, rt)` turn a ModelConfig (what
the model is) and a Runtime (how it runs) into layers, so every family builds them the
same way: a new attention variant, norm or MoE reaches every family through one factory,
never through an argument threaded into each model.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig, Runtime
from jaxlm.errors import ConfigError
from jaxlm.layers.attention import Attention
from jaxlm.layers.dropout import dropout
from jaxlm.layers.mlp import MLP
from jaxlm.layers.moe import MoE
from jaxlm.layers.norm import LayerNorm, RMSNorm
from jaxlm.models.base import alibi_spec, dtypes, rope_spec


def norm(cfg: ModelConfig) -> nnx.Module:
  """The config's norm (LayerNorm or RMSNorm, eps layer_norm_eps), in param_dtype."""
  if cfg.norm_type == "rmsnorm":
    return RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, scale_offset=cfg.norm_scale_offset,
                   param_dtype=jnp.dtype(cfg.param_dtype))
  return LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, use_bias=cfg.norm_bias,
                   param_dtype=jnp.dtype(cfg.param_dtype))


def qk_norm(cfg: ModelConfig, heads: int) -> nnx.Module:
  """The norm of `heads` heads' queries or keys (model.qk_norm), eps layer_norm_eps."""
  dtype = jnp.dtype(cfg.param_dtype)
  if cfg.qk_norm == "rmsnorm":
    return RMSNorm(cfg.head_size, eps=cfg.layer_norm_eps, scale_offset=cfg.norm_scale_offset,
                   param_dtype=dtype)
  return LayerNorm((heads, cfg.head_size), eps=cfg.layer_norm_eps, use_bias=False,
                   param_dtype=dtype)


def attention(cfg: ModelConfig, rt: Runtime, *, cross: bool = False, layer: int | None = None,
              rngs: nnx.Rngs) -> Attention:
  """Self- or cross-attention as the config describes it, for decoder layer `layer` (its
  RoPE may be the layer type's: base.rope_spec). T5-style models (a learned
  relative-position bias) leave logits unscaled: T5 folds 1/sqrt(d) into the query
  initialization; Gemma 2 scales by 1/sqrt(query_pre_attn_scalar)."""
  relative = cfg.position_embedding_type == "relative"
  scale = None
  if relative:
    scale = 1.0
  elif cfg.query_pre_attn_scalar is not None:
    scale = cfg.query_pre_attn_scalar ** -0.5
  q_norm = k_norm = None
  if cfg.qk_norm is not None and not cross:
    q_norm, k_norm = qk_norm(cfg, cfg.num_attention_heads), qk_norm(cfg, cfg.kv_heads)
  return Attention(cfg.hidden_size, cfg.num_attention_heads,
                   num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_size,
                   use_bias=cfg.attention_bias, out_bias=cfg.attention_out_bias,
                   dropout_rate=cfg.attention_probs_dropout_prob,
                   init_std=cfg.initializer_range, impl=rt.attention_impl,
                   alibi=None if cross else alibi_spec(cfg),
                   rope=None if cross else rope_spec(cfg, layer), dense_bias=relative,
                   scale=scale, softcap=cfg.attn_logit_softcapping, clip=cfg.clip_qkv,
                   q_norm=q_norm, k_norm=k_norm, cross=cross, rngs=rngs,
                   **dtypes(cfg, rt))


def feed_forward(cfg: ModelConfig, rt: Runtime, *, rngs: nnx.Rngs) -> nnx.Module:
  """The dense MLP the config describes, or a sparse mixture of such MLPs when
  `num_local_experts` > 0."""
  if cfg.num_local_experts > 0:
    return MoE(cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts,
               cfg.num_experts_per_tok, activation=cfg.hidden_act,
               gated=cfg.mlp_type == "gated", use_bias=cfg.mlp_bias,
               capacity_factor=cfg.moe_capacity_factor, norm_p=cfg.router_norm_p,
               init_std=cfg.initializer_range, rngs=rngs, **dtypes(cfg, rt))
  return MLP(cfg.hidden_size, cfg.intermediate_size, activation=cfg.hidden_act,
             gated=cfg.mlp_type == "gated", use_bias=cfg.mlp_bias,
             init_std=cfg.initializer_range, rngs=rngs, **dtypes(cfg, rt))


class TransformerBlock(nnx.Module):
  """Self-attention, optional cross-attention (`cross=True`: encoder-decoder decoders)
  and a feed-forward, each with its norm, in the config's residual layout. `layer`: its
  index in a decoder stack, for what layer_types chooses per layer (the RoPE base)."""

  def __init__(self, cfg: ModelConfig, rt: Runtime, *, cross: bool = False,
               layer: int | None = None, rngs: nnx.Rngs):
    if cfg.parallel_residual and cfg.norm_position != "pre":
      raise ConfigError("model.parallel_residual requires model.norm_position='pre'")
    if cross and (cfg.parallel_residual or cfg.norm_position != "pre" or cfg.sandwich_norm):
      raise ConfigError("cross-attention blocks are sequential pre-LN (T5)")
    self.attn_norm = norm(cfg)
    self.attn = attention(cfg, rt, layer=layer, rngs=rngs)
    # sandwich_norm: the sublayers' outputs are normed too, before the residual add.
    self.attn_out_norm = norm(cfg) if cfg.sandwich_norm else None
    self.cross_norm = norm(cfg) if cross else None
    self.cross_attn = attention(cfg, rt, cross=True, rngs=rngs) if cross else None
    # parallel_shared_norm: the attention's input norm feeds the MLP too
    self.mlp_norm = None if cfg.parallel_shared_norm else norm(cfg)
    self.mlp = feed_forward(cfg, rt, rngs=rngs)
    self.mlp_out_norm = norm(cfg) if cfg.sandwich_norm else None
    self.layout = "parallel" if cfg.parallel_residual else cfg.norm_position
    self.dropout_rate = cfg.hidden_dropout_prob

  def init_cache(self, batch_size: int, size: int, dtype=None) -> dict:
    """{"self": KVCache of `size` slots} (+ "cross": an empty cache its first call fills)."""
    cache = {"self": self.attn.init_cache(batch_size, size, dtype)}
    if self.cross_attn is not None:
      cache["cross"] = self.cross_attn.init_cache(batch_size, 0, dtype)
    return cache

  def __call__(self, x_BTD, mask, *, rope=None, bias=None, enc_BSD=None, enc_mask=None,
               positions=None, cache: dict | None = None, rngs: nnx.Rngs | None = None):
    """One block; returns (cache, x_BTD).

    Args:
      mask: the self-attention mask (a MaskSpec or a dense boolean mask).
      rope: (cos, sin) for q and k; bias: additive self-attention logits bias (ALiBi,
        T5 relative positions; see Attention for its form with a cache).
      enc_BSD, enc_mask: encoder states and their mask, for cross-attention (with a
        cache, encoder states are needed on the first call only).
      positions: [B, T] positions of the tokens (required with a cache).
      cache: this block's caches (`init_cache`), or None.
    """
    cache = dict(cache) if cache is not None else None

    def attn(h_BTD):
      c, out = self.attn(h_BTD, mask=mask, rope=rope, bias=bias, position_ids=positions,
                         cache=None if cache is None else cache["self"], rngs=rngs)
      if cache is not None:
        cache["self"] = c
      if self.attn_out_norm is not None:
        out = self.attn_out_norm(out)
      return dropout(out, self.dropout_rate, rngs)

    def mlp(h_BTD):
      out = self.mlp(h_BTD)
      if self.mlp_out_norm is not None:
        out = self.mlp_out_norm(out)
      return dropout(out, self.dropout_rate, rngs)

    if self.layout == "post":
      x_BTD = self.attn_norm(x_BTD + attn(x_BTD))
      return cache, self.mlp_norm(x_BTD + mlp(x_BTD))
    if self.layout == "parallel":
      h_BTD = self.attn_norm(x_BTD)
      mlp_in_BTD = h_BTD if self.mlp_norm is None else self.mlp_norm(x_BTD)
      return cache, x_BTD + attn(h_BTD) + mlp(mlp_in_BTD)
    x_BTD = x_BTD + attn(self.attn_norm(x_BTD))
    if self.cross_attn is not None:
      c, h_BTD = self.cross_attn(self.cross_norm(x_BTD), kv_BSD=enc_BSD, mask=enc_mask,
                                 cache=None if cache is None else cache["cross"], rngs=rngs)
      if cache is not None:
        cache["cross"] = c
      x_BTD = x_BTD + dropout(h_BTD, self.dropout_rate, rngs)
    return cache, x_BTD + mlp(self.mlp_norm(x_BTD))
