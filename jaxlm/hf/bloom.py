"""BLOOM (BloomForCausalLM): ALiBi instead of positions, a LayerNorm right after the word
embedding, per-head interleaved query_key_value, LM head tied to the word embedding."""

from __future__ import annotations

from jaxlm.config import ModelConfig
from jaxlm.hf.common import (TensorMap, common_to_hf, expect, qkv_fuse_interleaved,
                             qkv_split_interleaved, map_family, require,
                             special_tokens_from_hf)


def config_from_hf(hf: dict) -> ModelConfig:
  require(hf, "apply_residual_connection_post_layernorm", lambda v: not v, False,
          "the residual is always the block input")
  d = hf.get("n_embed") or hf.get("hidden_size", 64)  # old configs spell it n_embed
  return ModelConfig(
      model_type="bloom", vocab_size=hf.get("vocab_size", 250880), hidden_size=d,
      num_hidden_layers=hf.get("n_layer", 2), num_attention_heads=hf.get("n_head", 8),
      intermediate_size=4 * d, hidden_act="gelu_new",  # BLOOM's tanh GELU
      hidden_dropout_prob=hf.get("hidden_dropout", 0.0),
      attention_probs_dropout_prob=hf.get("attention_dropout", 0.0),
      max_position_embeddings=2048,  # ALiBi has no position table; kept for validation only
      type_vocab_size=0, layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
      initializer_range=hf.get("initializer_range", 0.02),
      tie_word_embeddings=hf.get("tie_word_embeddings", True),
      causal=True, norm_position="pre", embedding_norm=True, position_embedding_type="alibi",
      **{**special_tokens_from_hf(hf), "bos_token_id": hf.get("bos_token_id", 1),
         "eos_token_id": hf.get("eos_token_id", 2)})


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
  expect(cfg, "BLOOM", causal=True, norm_type="layernorm", norm_position="pre", norm_bias=True,
         embedding_norm=True, mlp_type="plain", mlp_bias=True, attention_bias=True,
         parallel_residual=False, sliding_window=None, position_embedding_type="alibi",
         hidden_act="gelu_new", intermediate_size=4 * cfg.hidden_size,
         num_key_value_heads=None, head_dim=None)
  if cfg.attention_out_bias is False:
    expect(cfg, "BLOOM", attention_out_bias=None)
  return {
      **common_to_hf(cfg, arch, "bloom"),
      "hidden_size": cfg.hidden_size, "n_layer": cfg.num_hidden_layers,
      "n_head": cfg.num_attention_heads, "layer_norm_epsilon": cfg.layer_norm_eps,
      "hidden_dropout": cfg.hidden_dropout_prob,
      "attention_dropout": cfg.attention_probs_dropout_prob,
      "apply_residual_connection_post_layernorm": False, "pretraining_tp": 1,
      "slow_but_exact": False,
  }


def tensor_map(cfg: ModelConfig) -> TensorMap:
  N, H = cfg.num_attention_heads, cfg.head_size
  tm = TensorMap("transformer.")
  tm.rename("transformer.word_embeddings.weight", "model.embed.embedding")
  tm.norm("transformer.word_embeddings_layernorm", "model.embed_norm", bias=True)
  for i in range(cfg.num_hidden_layers):
    h, j = f"transformer.h.{i}", f"model.layers.{i}"
    tm.norm(f"{h}.input_layernorm", f"{j}.attn_norm", bias=True)
    tm.fused_linear(f"{h}.self_attention.query_key_value", [f"{j}.attn.{n}" for n in "qkv"],
                    lambda w: qkv_split_interleaved(w, N, H),
                    lambda ps: qkv_fuse_interleaved(ps, N, H), bias=True)
    tm.linear(f"{h}.self_attention.dense", f"{j}.attn.o", bias=True)
    tm.norm(f"{h}.post_attention_layernorm", f"{j}.mlp_norm", bias=True)
    tm.linear(f"{h}.mlp.dense_h_to_4h", f"{j}.mlp.up", bias=True)
    tm.linear(f"{h}.mlp.dense_4h_to_h", f"{j}.mlp.down", bias=True)
  tm.norm("transformer.ln_f", "model.norm", bias=True)
  return tm.lm_head("lm_head", tied=cfg.tie_word_embeddings)


FAMILIES = (map_family("bloom", ("BloomForCausalLM",), config_from_hf, config_to_hf,
                        tensor_map),)
