"""GPT-NeoX (GPTNeoXForCausalLM, Pythia): partial RoPE, parallel residual, per-head
interleaved query_key_value, untied embed_out head by default."""

from __future__ import annotations

from jaxlm.config import ModelConfig
from jaxlm.hf.common import (TensorMap, common_to_hf, expect, qkv_fuse_interleaved,
                             qkv_split_interleaved, map_family, rope_from_hf, rope_to_hf,
                             special_tokens_from_hf)


def config_from_hf(hf: dict) -> ModelConfig:
  bias = hf.get("attention_bias", True)
  return ModelConfig(
      model_type="gpt_neox", vocab_size=hf.get("vocab_size", 50432),
      hidden_size=hf.get("hidden_size", 6144), num_hidden_layers=hf.get("num_hidden_layers", 44),
      num_attention_heads=hf.get("num_attention_heads", 64),
      intermediate_size=hf.get("intermediate_size", 24576), hidden_act=hf.get("hidden_act", "gelu"),
      hidden_dropout_prob=hf.get("hidden_dropout", 0.0),
      attention_probs_dropout_prob=hf.get("attention_dropout", 0.0),
      max_position_embeddings=hf.get("max_position_embeddings", 2048), type_vocab_size=0,
      layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
      initializer_range=hf.get("initializer_range", 0.02),
      tie_word_embeddings=hf.get("tie_word_embeddings", False),
      causal=True, norm_position="pre", attention_bias=bias, attention_out_bias=bias,
      parallel_residual=hf.get("use_parallel_residual", True), position_embedding_type="rope",
      **rope_from_hf(hf, default_partial=0.25),
      **{**special_tokens_from_hf(hf), "bos_token_id": hf.get("bos_token_id", 0),
         "eos_token_id": hf.get("eos_token_id", 2)})


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
  expect(cfg, "GPT-NeoX", causal=True, norm_type="layernorm", norm_position="pre",
         norm_bias=True, embedding_norm=False, mlp_type="plain", mlp_bias=True,
         sliding_window=None, position_embedding_type="rope", num_key_value_heads=None,
         head_dim=None)
  if cfg.attention_out_bias not in (None, cfg.attention_bias):
    expect(cfg, "GPT-NeoX", attention_out_bias=cfg.attention_bias)
  return {
      **common_to_hf(cfg, arch, "gpt_neox"),
      "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
      "num_attention_heads": cfg.num_attention_heads, "intermediate_size": cfg.intermediate_size,
      "hidden_act": cfg.hidden_act, "max_position_embeddings": cfg.max_position_embeddings,
      "layer_norm_eps": cfg.layer_norm_eps, "hidden_dropout": cfg.hidden_dropout_prob,
      "attention_dropout": cfg.attention_probs_dropout_prob,
      "attention_bias": cfg.attention_bias, "use_parallel_residual": cfg.parallel_residual,
      "rope_parameters": rope_to_hf(cfg, with_partial=True),
  }


def tensor_map(cfg: ModelConfig) -> TensorMap:
  N, H = cfg.num_attention_heads, cfg.head_size
  # attention.bias / masked_bias / rotary_emb.inv_freq: buffers older checkpoints saved.
  tm = TensorMap("gpt_neox.", ignore=[r"\.attention\.(masked_)?bias$", r"\.inv_freq$"])
  tm.rename("gpt_neox.embed_in.weight", "model.embed.embedding")
  for i in range(cfg.num_hidden_layers):
    h, j = f"gpt_neox.layers.{i}", f"model.layers.{i}"
    tm.norm(f"{h}.input_layernorm", f"{j}.attn_norm", bias=True)
    tm.fused_linear(f"{h}.attention.query_key_value", [f"{j}.attn.{n}" for n in "qkv"],
                    lambda w: qkv_split_interleaved(w, N, H),
                    lambda ps: qkv_fuse_interleaved(ps, N, H), bias=cfg.attention_bias)
    tm.linear(f"{h}.attention.dense", f"{j}.attn.o", bias=cfg.attention_bias)
    tm.norm(f"{h}.post_attention_layernorm", f"{j}.mlp_norm", bias=True)
    tm.linear(f"{h}.mlp.dense_h_to_4h", f"{j}.mlp.up", bias=True)
    tm.linear(f"{h}.mlp.dense_4h_to_h", f"{j}.mlp.down", bias=True)
  tm.norm("gpt_neox.final_layer_norm", "model.norm", bias=True)
  return tm.lm_head("embed_out", tied=cfg.tie_word_embeddings)


FAMILIES = (map_family("gpt_neox", ("GPTNeoXForCausalLM",), config_from_hf, config_to_hf,
                        tensor_map),)
