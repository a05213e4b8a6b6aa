"""Encoder-decoder models: T5 and T5 v1.1 (T5ForConditionalGeneration), two stacks of the
shared TransformerBlock (models/block.py; pre-LN, cross-attention in the decoder's).

  encoder: tokens -> shared embed -> N x [x += attn(norm x); x += ff(norm x)] -> norm
  decoder: tokens -> shared embed -> M x [x += causal attn(norm x);
                                          x += cross attn(norm x, encoder);
                                          x += ff(norm x)] -> norm -> LM head

No absolute positions: each stack holds ONE learned table of relative-position logit
biases (bidirectional buckets in the encoder, causal ones in the decoder) that every
self-attention layer of that stack adds; cross-attention has none. Norms are RMSNorm
without bias, projections have no biases, and attention is unscaled (T5 folds 1/sqrt(d)
into the query initialization). T5 uses a ReLU MLP, v1.1 a gated-GELU one; both come
from `feed_forward`, so a mixture-of-experts config swaps them everywhere.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig, Runtime
from jaxlm.errors import ConfigError
from jaxlm.layers.attention import MaskSpec
from jaxlm.layers.dropout import dropout
from jaxlm.layers.embed import Embed
from jaxlm.layers.linear import Dense
from jaxlm.layers.position import RelativePositionBias
from jaxlm.layers.vocab_loss import Projection
from jaxlm.models.base import RESIDUAL_AXES, PreTrainedModel, dtypes, router_outputs, run_block
from jaxlm.models.block import TransformerBlock, norm
from jaxlm.models.outputs import ModelOutput
from jaxlm.parallel.rules import constrain

# Block-layout fields that T5 fixes; any other value would be silently ignored, so it is
# refused. (mlp_type, hidden_act, mlp_bias and num_key_value_heads are honoured.)
_T5_FIXED = dict(causal=False, norm_type="rmsnorm", norm_position="pre", embedding_norm=False,
                 parallel_residual=False, sliding_window=None, attention_bias=False,
                 position_embedding_type="relative", position_ids_from_mask=False,
                 layer_types=None, sandwich_norm=False, scale_embeddings=False,
                 query_pre_attn_scalar=None, final_logit_softcapping=None, logit_scale=None,
                 rope_interleaved=False)


def _check_t5_config(cfg: ModelConfig) -> None:
  for key, value in _T5_FIXED.items():
    if getattr(cfg, key) != value:
      raise ConfigError(f"model.{key}={getattr(cfg, key)!r} is not supported by "
                        f"T5ForConditionalGeneration (only {value!r})")
  if cfg.attention_out_bias:
    raise ConfigError("model.attention_out_bias=True is not supported by "
                      "T5ForConditionalGeneration (T5 projections have no biases)")


class T5Stack(nnx.Module):
  """The block stack of one side (embeddings are shared and live on the model)."""

  def __init__(self, cfg: ModelConfig, rt: Runtime, *, decoder: bool, rngs: nnx.Rngs):
    depth = cfg.decoder_layers if decoder else cfg.num_hidden_layers
    self.config, self.runtime = cfg, rt
    # One bias table per stack, shared by all its layers (HF keeps it in block 0).
    self.position = RelativePositionBias(
        cfg.relative_attention_num_buckets, cfg.num_attention_heads, bidirectional=not decoder,
        max_distance=cfg.relative_attention_max_distance, init_std=cfg.initializer_range,
        param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    self.layers = nnx.List([TransformerBlock(cfg, rt, cross=decoder, rngs=rngs)
                            for _ in range(depth)])
    self.norm = norm(cfg)
    self.dropout_rate = cfg.hidden_dropout_prob

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> list[dict]:
    return [layer.init_cache(batch_size, max_length, dtype) for layer in self.layers]

  def __call__(self, x_BTD, mask, *, enc_BSD=None, enc_mask=None, cache=None, rngs=None):
    """Returns (cache, hidden states); with a cache (the decoder, incrementally), the
    relative-position bias is looked up per layer against the cached keys' positions."""
    B, T, _ = x_BTD.shape
    kw = {}
    if cache is None:
      positions_T = jnp.arange(T)
      bias = self.position(positions_T, positions_T)  # computed once, used by every layer
    else:
      positions = jnp.broadcast_to(cache[0]["self"].index + jnp.arange(T), (B, T))
      bias = self.position  # (q positions [B, T], k positions [B, S]) -> [B, N, T, S]
    x_BTD = dropout(x_BTD, self.dropout_rate, rngs)
    new_cache = []
    for i, layer in enumerate(self.layers):
      if cache is not None:
        kw = {"cache": cache[i], "positions": positions}
      c, x_BTD = run_block(self.runtime, layer, x_BTD, mask, bias=bias, enc_BSD=enc_BSD,
                           enc_mask=enc_mask, rngs=rngs, **kw)
      new_cache.append(c)
      x_BTD = constrain(x_BTD, RESIDUAL_AXES)
    return (None if cache is None else new_cache), dropout(self.norm(x_BTD), self.dropout_rate,
                                                           rngs)


class T5ForConditionalGeneration(PreTrainedModel):
  """T5 / T5 v1.1 with the LM head: tied to the shared embedding (decoder output scaled
  by d_model**-0.5 first, as T5 does) or a bias-free Dense (v1.1, no scaling)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, runtime: Runtime = Runtime()):
    _check_t5_config(cfg)
    self.config, self.runtime = cfg, runtime
    self.shared = Embed(cfg.vocab_size, cfg.hidden_size, init_std=cfg.initializer_range,
                        rngs=rngs, **dtypes(cfg, runtime))
    self.encoder = T5Stack(cfg, runtime, decoder=False, rngs=rngs)
    self.decoder = T5Stack(cfg, runtime, decoder=True, rngs=rngs)
    self.lm_head = None if cfg.tie_word_embeddings else Dense(
        cfg.hidden_size, cfg.vocab_size, use_bias=False, init_std=cfg.initializer_range,
        axes=("embed", "vocab"), rngs=rngs, **dtypes(cfg, runtime))

  def encode(self, input_ids_BS, attention_mask=None, *, rngs: nnx.Rngs | None = None):
    """Encoder hidden states [B, S, D] (float32). attention_mask [B, S]: 1 = real token."""
    mask = MaskSpec.build(input_ids_BS.shape[1], attention_mask=attention_mask)
    return self.encoder(self.shared(input_ids_BS), mask, rngs=rngs)[1]

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> list[dict]:
    """The decoder's KV caches for up to `max_length` decoder tokens; the first `decode`
    with it also caches every layer's cross-attention keys and values of the encoder
    states, so later steps pass encoder_hidden_BSD=None."""
    return self.decoder.init_cache(batch_size, max_length, dtype)

  def decode(self, decoder_input_ids_BT, encoder_hidden_BSD, attention_mask=None,
             decoder_attention_mask=None, *, cache: list | None = None,
             project_logits: bool = True, rngs: nnx.Rngs | None = None) -> ModelOutput:
    """Next-token logits [B, T, V] (float32) and the decoder's final hidden states
    (their Projection in place of logits when `project_logits` is False).

    attention_mask [B, S] marks the real encoder tokens (cross-attention keys);
    decoder_attention_mask [B, T] the real decoder tokens (on top of the causal mask).
    With a cache (`init_cache`), the new decoder tokens continue the cached ones, and the
    output carries the updated cache.
    """
    T = decoder_input_ids_BT.shape[1]
    mask = MaskSpec.build(T, causal=True, attention_mask=decoder_attention_mask)
    enc_mask = MaskSpec.build(T, kv_mask=attention_mask)
    cache, h_BTD = self.decoder(self.shared(decoder_input_ids_BT), mask,
                                enc_BSD=encoder_hidden_BSD, enc_mask=enc_mask, cache=cache,
                                rngs=rngs)
    if self.lm_head is None:
      # Tied: T5 rescales the decoder output so the embedding can serve as the head.
      proj = self.shared.projection(h_BTD * self.config.hidden_size ** -0.5)
    else:
      proj = Projection.of_dense(self.lm_head, h_BTD)
    head = {"logits": proj.logits()} if project_logits else {"projection": proj}
    return ModelOutput(last_hidden_state=h_BTD, cache=cache, **head)

  def __call__(self, input_ids_BS, attention_mask=None, *, decoder_input_ids,
               decoder_attention_mask=None, project_logits: bool = True,
               rngs: nnx.Rngs | None = None) -> ModelOutput:
    """Teacher-forced forward pass.

    Args:
      input_ids_BS: int [B, S] encoder tokens.
      attention_mask: [B, S], 1 = real token, 0 = padding (default all real).
      decoder_input_ids: int [B, T], usually the targets shifted right behind
        `config.decoder_start_token_id`.
      decoder_attention_mask: [B, T], 1 = real token (default all real).
      rngs: dropout randomness; None = deterministic.

    Returns:
      ModelOutput with logits [B, T, V] (float32), last_hidden_state [B, T, D] (decoder)
      and encoder_last_hidden_state [B, S, D].
    """
    enc_BSD = self.encode(input_ids_BS, attention_mask, rngs=rngs)
    out = self.decode(decoder_input_ids, enc_BSD, attention_mask, decoder_attention_mask,
                      project_logits=project_logits, rngs=rngs)
    # The two stacks route different tokens: each side's statistics skip its own padding.
    masks = {"encoder": attention_mask, "decoder": decoder_attention_mask}
    return out.replace(encoder_last_hidden_state=enc_BSD, **router_outputs(self, masks))


ARCHITECTURES = {"T5ForConditionalGeneration": T5ForConditionalGeneration}
