"""T5 and T5 v1.1 (T5ForConditionalGeneration): RMSNorm, no biases, unscaled attention,
one relative-position bias table per stack (HF stores it in block 0), ReLU or gated-GELU
feed-forward, LM head tied to `shared` (with output scaling) or separate (v1.1).

HF details handled here:
- `encoder.embed_tokens` / `decoder.embed_tokens` are tied copies of `shared`; files may
  carry them, and they are ignored (transformers re-ties them from `shared`).
- transformers 5 always sets `tie_word_embeddings=True` on T5 configs and keeps the old
  meaning of the flag in `scale_decoder_outputs`; a separate head is recognised by the
  checkpoint holding an `lm_head.weight` that differs from `shared.weight`. Hub configs
  (transformers 4) say `tie_word_embeddings: false` instead. Both spellings are read; we
  write the one both versions understand.
"""

from __future__ import annotations

import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError, DataError
from jaxlm.hf.common import SOURCE, TensorMap, common_to_hf, expect
from jaxlm.hf.family import Family, Tensors
from jaxlm.layers.activations import ACTIVATIONS

_ARCH = "T5ForConditionalGeneration"
_MAX_POSITIONS = 512  # T5 has no position table; jaxlm's field is informational here


def _feed_forward_from_hf(proj: str) -> tuple[str, str]:
  """`feed_forward_proj` -> (mlp_type, hidden_act), with HF's reading of the string."""
  parts = proj.split("-") if isinstance(proj, str) else []
  gated = len(parts) == 2 and parts[0] == "gated"
  act = parts[-1] if parts else None
  if proj == "gated-gelu":  # HF maps it to the tanh approximation (as Mesh TF did)
    act = "gelu_new"
  if not (len(parts) == 1 or gated) or act not in ACTIVATIONS:
    raise ConfigError(f"config.json: feed_forward_proj={proj!r} is not supported "
                      f"('<act>' or 'gated-<act>', act one of {sorted(ACTIVATIONS)})")
  return ("gated" if gated else "plain"), act


def _feed_forward_to_hf(cfg: ModelConfig) -> str:
  if cfg.mlp_type == "plain":
    return cfg.hidden_act
  if cfg.hidden_act == "gelu":  # "gated-gelu" means the tanh approximation to HF
    raise ConfigError("model.hidden_act='gelu' (exact) cannot be saved as a gated T5 "
                      "feed-forward (HF reads 'gated-gelu' as gelu_new)")
  return "gated-gelu" if cfg.hidden_act == "gelu_new" else f"gated-{cfg.hidden_act}"


def config_from_hf(hf: dict) -> ModelConfig:
  mlp_type, act = _feed_forward_from_hf(hf.get("feed_forward_proj", "relu"))
  layers = hf.get("num_layers", 6)
  dropout = hf.get("dropout_rate", 0.1)
  pad = hf.get("pad_token_id", 0)
  # transformers 5 writes scale_decoder_outputs (and always tie_word_embeddings=True).
  tied = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
  return ModelConfig(
      model_type="t5", vocab_size=hf.get("vocab_size", 32128), hidden_size=hf.get("d_model", 512),
      num_hidden_layers=layers, num_decoder_layers=hf.get("num_decoder_layers") or layers,
      num_attention_heads=hf.get("num_heads", 8), head_dim=hf.get("d_kv", 64),
      intermediate_size=hf.get("d_ff", 2048), hidden_act=act, mlp_type=mlp_type,
      mlp_bias=False, attention_bias=False, hidden_dropout_prob=dropout,
      attention_probs_dropout_prob=dropout,
      max_position_embeddings=hf.get("n_positions") or _MAX_POSITIONS, type_vocab_size=0,
      layer_norm_eps=hf.get("layer_norm_epsilon", 1e-6),
      initializer_range=hf.get("initializer_range", 0.02), tie_word_embeddings=bool(tied),
      norm_type="rmsnorm", norm_position="pre", norm_bias=False,
      position_embedding_type="relative",
      relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
      pad_token_id=pad, eos_token_id=hf.get("eos_token_id", 1),
      bos_token_id=hf.get("bos_token_id"),
      decoder_start_token_id=hf.get("decoder_start_token_id", pad))


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
  expect(cfg, "T5", causal=False, norm_type="rmsnorm", norm_position="pre", embedding_norm=False,
         mlp_bias=False, attention_bias=False, parallel_residual=False, sliding_window=None,
         position_embedding_type="relative", num_local_experts=0,
         attention_probs_dropout_prob=cfg.hidden_dropout_prob)
  if cfg.kv_heads != cfg.num_attention_heads:  # T5 has no grouped K/V heads
    expect(cfg, "T5", num_key_value_heads=None)
  if cfg.attention_out_bias:
    expect(cfg, "T5", attention_out_bias=None)
  return {
      **common_to_hf(cfg, arch, "t5"),
      "d_model": cfg.hidden_size, "d_kv": cfg.head_size, "d_ff": cfg.intermediate_size,
      "num_layers": cfg.num_hidden_layers, "num_decoder_layers": cfg.decoder_layers,
      "num_heads": cfg.num_attention_heads,
      "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
      "relative_attention_max_distance": cfg.relative_attention_max_distance,
      "dropout_rate": cfg.hidden_dropout_prob, "layer_norm_epsilon": cfg.layer_norm_eps,
      "feed_forward_proj": _feed_forward_to_hf(cfg), "n_positions": cfg.max_position_embeddings,
      "decoder_start_token_id": cfg.decoder_start_token_id, "is_encoder_decoder": True,
      # Both spellings agree: transformers 4 reads the first, 5 the second.
      "scale_decoder_outputs": cfg.tie_word_embeddings,
  }


def _attention(tm: TensorMap, hf: str, jax: str) -> None:
  for name in "qkvo":
    tm.linear(f"{hf}.{name}", f"{jax}.{name}", bias=False)


def _feed_forward(tm: TensorMap, cfg: ModelConfig, hf: str, jax: str) -> None:
  ins = (("wi_0", "gate"), ("wi_1", "up")) if cfg.mlp_type == "gated" else (("wi", "up"),)
  for hf_name, jax_name in (*ins, ("wo", "down")):
    tm.linear(f"{hf}.DenseReluDense.{hf_name}", f"{jax}.mlp.{jax_name}", bias=False)
  tm.norm(f"{hf}.layer_norm", f"{jax}.mlp_norm", bias=False)


def tensor_map(cfg: ModelConfig) -> TensorMap:
  # Tied embedding copies, and a cross-attention bias table old checkpoints carry (unused,
  # as in transformers' _keys_to_ignore_on_load_unexpected).
  tm = TensorMap(ignore=[r"^(encoder|decoder)\.embed_tokens\.weight$",
                         r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias"])
  tm.rename("shared.weight", "shared.embedding")
  for side, depth in (("encoder", cfg.num_hidden_layers), ("decoder", cfg.decoder_layers)):
    tm.rename(f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
              f"{side}.position.embedding")
    for i in range(depth):
      h, j = f"{side}.block.{i}.layer", f"{side}.layers.{i}"
      _attention(tm, f"{h}.0.SelfAttention", f"{j}.attn")
      tm.norm(f"{h}.0.layer_norm", f"{j}.attn_norm", bias=False)
      if side == "decoder":
        _attention(tm, f"{h}.1.EncDecAttention", f"{j}.cross_attn")
        tm.norm(f"{h}.1.layer_norm", f"{j}.cross_norm", bias=False)
      _feed_forward(tm, cfg, f"{h}.{2 if side == 'decoder' else 1}", j)
    tm.norm(f"{side}.final_layer_norm", f"{side}.norm", bias=False)
  return tm.lm_head("lm_head", tied=cfg.tie_word_embeddings)


def params_from_hf(tensors: Tensors, cfg: ModelConfig, arch: str, expected) -> Tensors:
  head, shared = tensors.get("lm_head.weight"), tensors.get("shared.weight")
  if cfg.tie_word_embeddings and head is not None and shared is not None and not np.array_equal(
      head, shared):
    # transformers would untie them and still scale the output: not a jaxlm layout.
    raise DataError(f"{SOURCE}: tensor 'lm_head.weight' differs from 'shared.weight', but the "
                    "config ties them (set tie_word_embeddings: false for a separate head)")
  if not cfg.tie_word_embeddings and head is None and shared is not None:
    tensors = {**tensors, "lm_head.weight": shared}  # transformers 5 ties a missing head
  return tensor_map(cfg).from_hf(tensors, expected, arch)


def params_to_hf(params: Tensors, cfg: ModelConfig, arch: str) -> Tensors:
  return tensor_map(cfg).to_hf(params)


FAMILIES = (Family("t5", (_ARCH,), config_from_hf, config_to_hf, params_from_hf,
                   params_to_hf),)
