"""Decoder-only causal language models (GPT-2, Llama, Mistral, BLOOM, MPT, GPT-NeoX, Mixtral,
Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3, Falcon, Cohere, Phi-3, DBRX).

One generic composition of the shared block (models/block.py), steered only by
ModelConfig fields:

  tokens -> embed (+ learned positions) (-> embed norm) -> N x TransformerBlock
         -> final norm (pre-LN) -> LM head (or a sequence classifier, `score`)

Positions enter as learned embeddings ("absolute"), rotations of q/k ("rope") or an
additive logits bias ("alibi"). Each layer attends within its own window
(`ModelConfig.layer_windows()`: Gemma 2 alternates sliding and full layers), and its KV
cache keeps only that many slots; it rotates with its own RoPE (`base.rope_spec(cfg, i)`:
Gemma 3's sliding layers have a base of their own). The families differ only in their configs
(jaxlm/hf/*.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig, Runtime
from jaxlm.errors import ConfigError
from jaxlm.layers.attention import MaskSpec
from jaxlm.layers.dropout import dropout
from jaxlm.layers.embed import Embed
from jaxlm.layers.linear import Dense
from jaxlm.layers.vocab_loss import Projection
from jaxlm.models.base import (RESIDUAL_AXES, PreTrainedModel, alibi_spec, dtypes, rope_spec,
                               router_outputs, run_block)
from jaxlm.models.block import TransformerBlock, norm
from jaxlm.models.heads import last_token_positions, pool_at
from jaxlm.models.outputs import ModelOutput
from jaxlm.parallel.rules import constrain


def segment_positions(segment_ids_BT):
  """Positions that restart at 0 wherever the segment id changes (packed documents)."""
  T = segment_ids_BT.shape[1]
  t_BT = jnp.broadcast_to(jnp.arange(T), segment_ids_BT.shape)
  starts_BT = jnp.concatenate(
      [jnp.ones_like(segment_ids_BT[:, :1], bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]],
      axis=1)
  start_BT = jax.lax.cummax(jnp.where(starts_BT, t_BT, 0), axis=1)
  return t_BT - start_BT


def decoder_mask(cfg: ModelConfig, T: int, attention_mask_BT=None, segment_ids_BT=None, *,
                 window: int | None) -> MaskSpec:
  """Causal (+ a sliding `window`: one layer's), real keys only, same segment only."""
  return MaskSpec.build(T, causal=cfg.causal, window=window if cfg.causal else None,
                        attention_mask=attention_mask_BT, segment_ids=segment_ids_BT)


class Decoder(nnx.Module):
  """Embeddings and the block stack; returns (cache, final hidden states [B, T, D])."""

  def __init__(self, cfg: ModelConfig, rt: Runtime, *, rngs: nnx.Rngs):
    kw = dict(init_std=cfg.initializer_range, rngs=rngs, **dtypes(cfg, rt))
    self.config, self.runtime = cfg, rt
    self.embed = Embed(cfg.vocab_size, cfg.hidden_size,
                       scale=cfg.hidden_size ** 0.5 if cfg.scale_embeddings else None, **kw)
    self.position = (Embed(cfg.max_position_embeddings, cfg.hidden_size, **kw)
                     if cfg.position_embedding_type == "absolute" else None)
    self.embed_norm = norm(cfg) if cfg.embedding_norm else None
    self.layers = nnx.List([TransformerBlock(cfg, rt, layer=i, rngs=rngs)
                            for i in range(cfg.num_hidden_layers)])
    self.norm = norm(cfg) if cfg.norm_position == "pre" else None
    self.ropes = tuple(rope_spec(cfg, i) for i in range(cfg.num_hidden_layers))  # per layer
    self.alibi = alibi_spec(cfg)

  def init_cache(self, batch_size: int, max_length: int, dtype=None,
                 window_slack: int = 0) -> list[dict]:
    """Per-layer KV caches for `max_length` tokens (prompt and output); a layer with a
    sliding window keeps `window` (+ `window_slack`) slots, however long the output grows,
    and a full-attention layer `max_length`. The slack is for callers that write columns
    they may take back (speculative decoding): a rolled-back column must not have evicted
    one a later query still sees."""
    return [layer.init_cache(batch_size,
                             max_length if w is None else min(max_length, w + window_slack),
                             dtype)
            for layer, w in zip(self.layers, self.config.layer_windows())]

  def __call__(self, input_ids_BT, attention_mask=None, *, segment_ids=None, position_ids=None,
               cache: list | None = None, rngs: nnx.Rngs | None = None):
    cfg = self.config
    B, T = input_ids_BT.shape
    if position_ids is None and cache is not None:  # continue after the cached columns
      position_ids = jnp.broadcast_to(cache[0]["self"].index + jnp.arange(T), (B, T))
    if position_ids is None:
      position_ids = (segment_positions(segment_ids) if segment_ids is not None
                      else jnp.broadcast_to(jnp.arange(T), (B, T)))
    windows = cfg.layer_windows()
    masks = {w: decoder_mask(cfg, T, attention_mask, segment_ids, window=w)
             for w in set(windows)}

    x_BTD = self.embed(input_ids_BT)
    if self.position is not None:
      x_BTD = x_BTD + self.position(position_ids)
    if self.embed_norm is not None:
      x_BTD = self.embed_norm(x_BTD)
    x_BTD = constrain(dropout(x_BTD, cfg.hidden_dropout_prob, rngs), RESIDUAL_AXES)

    # Position tables are computed once per forward and spec, shared by the layers using it.
    ropes = {spec: spec(position_ids) for spec in set(self.ropes) if spec is not None}
    # With a cache, attention computes ALiBi from the cached keys' positions.
    bias = self.alibi(position_ids) if self.alibi is not None and cache is None else None
    new_cache = []
    for i, layer in enumerate(self.layers):
      kw = {} if cache is None else {"cache": cache[i], "positions": position_ids}
      c, x_BTD = run_block(self.runtime, layer, x_BTD, masks[windows[i]],
                           rope=ropes.get(self.ropes[i]), bias=bias, rngs=rngs, **kw)
      new_cache.append(c)
      x_BTD = constrain(x_BTD, RESIDUAL_AXES)
    x_BTD = self.norm(x_BTD) if self.norm is not None else x_BTD
    return (None if cache is None else new_cache), x_BTD


class DecoderForCausalLM(PreTrainedModel):
  """A Decoder plus the LM head: tied to the token embedding or a bias-free Dense."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, runtime: Runtime = Runtime()):
    self.config, self.runtime = cfg, runtime
    self.model = Decoder(cfg, runtime, rngs=rngs)
    self.lm_head = None if cfg.tie_word_embeddings else Dense(
        cfg.hidden_size, cfg.vocab_size, use_bias=False, init_std=cfg.initializer_range,
        axes=("embed", "vocab"), rngs=rngs, **dtypes(cfg, runtime))

  def init_cache(self, batch_size: int, max_length: int, dtype=None,
                 window_slack: int = 0) -> list[dict]:
    """An empty KV cache for `batch_size` rows of up to `max_length` tokens (default dtype:
    the compute dtype); pass it as `cache=` and take the updated one from the output."""
    return self.model.init_cache(batch_size, max_length, dtype, window_slack)

  def __call__(self, input_ids_BT, attention_mask=None, *, segment_ids=None, position_ids=None,
               cache: list | None = None, project_logits: bool = True,
               rngs: nnx.Rngs | None = None) -> ModelOutput:
    """Next-token logits.

    Args:
      input_ids_BT: int [B, T].
      attention_mask: [B, T], 1 = real token, 0 = padding (keys only; default all real).
      segment_ids: int [B, T] for packed rows, 0 = padding: attention never crosses a
        segment boundary, and positions restart at each segment unless given.
      position_ids: int [B, T]; default 0..T-1 (or per segment, see above; with a cache,
        continuing after the cached columns).
      cache: from `init_cache` or a previous call's output: decode incrementally (the new
        tokens attend to the cached ones); `attention_mask` then marks padding among the
        new tokens. The output's `cache` holds the updated one.
      project_logits: False returns the head's Projection in place of the logits
        (layers.vocab_loss: the fused cross-entropy of training).
      rngs: dropout randomness; None = deterministic.

    Returns:
      ModelOutput with logits [B, T, V] (float32) and last_hidden_state [B, T, D].
    """
    cache, h_BTD = self.model(input_ids_BT, attention_mask, segment_ids=segment_ids,
                              position_ids=position_ids, cache=cache, rngs=rngs)
    proj = (self.model.embed.projection(h_BTD) if self.lm_head is None
            else Projection.of_dense(self.lm_head, h_BTD))
    if self.config.logit_scale is not None:  # Cohere: logits times logit_scale
      proj = proj.replace(scale=self.config.logit_scale)
    if self.config.final_logit_softcapping is not None:
      proj = proj.replace(softcap=self.config.final_logit_softcapping)
    if attention_mask is None and segment_ids is not None:
      attention_mask = segment_ids > 0  # packed rows: keep padding out of router statistics
    head = ({"logits": constrain(proj.logits(), ("batch", "length", "vocab"))}
            if project_logits else {"projection": proj})
    return ModelOutput(last_hidden_state=h_BTD, **head, cache=cache,
                       **router_outputs(self, attention_mask))


class DecoderForSequenceClassification(PreTrainedModel):
  """A Decoder plus `score`, a bias-free Dense to num_labels, read at each row's last real
  token (GPT2/Llama/MistralForSequenceClassification).

  Like transformers, the row's last real token is its rightmost token that is not
  config.pad_token_id, found from input_ids (heads.last_token_positions), not from the
  attention mask: pad with the pad id, on either side. Without a pad id only single rows
  are accepted (transformers refuses larger batches too) and the last position is read.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, runtime: Runtime = Runtime()):
    self.config, self.runtime = cfg, runtime
    self.model = Decoder(cfg, runtime, rngs=rngs)
    self.score = Dense(cfg.hidden_size, cfg.num_labels, use_bias=False,
                       init_std=cfg.initializer_range, rngs=rngs, **dtypes(cfg, runtime))

  def __call__(self, input_ids_BT, attention_mask=None, *, position_ids=None,
               rngs: nnx.Rngs | None = None) -> ModelOutput:
    """logits [B, num_labels] (float32) at each row's last real token; last_hidden_state
    [B, T, D]. attention_mask [B, T] (1 = real) masks keys, as in DecoderForCausalLM."""
    pad = self.config.pad_token_id
    if pad is None and input_ids_BT.shape[0] != 1:
      raise ConfigError(f"model.pad_token_id is None: a sequence classifier cannot find the "
                        f"last real token of {input_ids_BT.shape[0]} rows (set a pad id)")
    _, h_BTD = self.model(input_ids_BT, attention_mask, position_ids=position_ids, rngs=rngs)
    # Scored at every position and then pooled, as transformers does (the same numbers).
    logits_BTC = self.score(h_BTD)
    logits_BC = pool_at(logits_BTC, last_token_positions(input_ids_BT, pad))
    return ModelOutput(logits=logits_BC, last_hidden_state=h_BTD,
                       **router_outputs(self, attention_mask))


# Hugging Face class names; every family is the same composition with a different config.
ARCHITECTURES = {
    name: DecoderForCausalLM
    for name in ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM",
                 "BloomForCausalLM", "MptForCausalLM", "GPTNeoXForCausalLM",
                 "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
                 "FalconForCausalLM", "CohereForCausalLM", "Phi3ForCausalLM", "DbrxForCausalLM")
}
ARCHITECTURES.update({
    name: DecoderForSequenceClassification
    for name in ("GPT2ForSequenceClassification", "LlamaForSequenceClassification",
                 "MistralForSequenceClassification")
})
