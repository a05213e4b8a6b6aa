"""MPT (MptForCausalLM): ALiBi, bias-free LayerNorms and projections, a fused [q | k | v]
Wqkv, LM head tied to wte.

Semantics follow the transformers class, which always uses ALiBi with alibi_bias_max=8,
biases off and a 4x MLP whatever the config says; options it does implement but jaxlm does
not (clip_qkv, a custom softmax_scale) are refused by name.
"""

from __future__ import annotations

import math

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.hf.common import (TensorMap, common_to_hf, expect, qkv_fuse_blocks, qkv_split_blocks,
                             map_family, special_tokens_from_hf)


def config_from_hf(hf: dict) -> ModelConfig:
  attn = hf.get("attn_config") or {}
  d, heads = hf.get("d_model", 2048), hf.get("n_heads", 16)
  if attn.get("clip_qkv"):
    raise ConfigError(f"config.json: attn_config.clip_qkv={attn['clip_qkv']!r} is not supported")
  scale = attn.get("softmax_scale")
  if scale is not None and not math.isclose(scale, (d // heads) ** -0.5, rel_tol=1e-6):
    raise ConfigError(f"config.json: attn_config.softmax_scale={scale!r} is not supported "
                      "(only 1/sqrt(head_dim))")
  return ModelConfig(
      model_type="mpt", vocab_size=hf.get("vocab_size", 50368), hidden_size=d,
      num_hidden_layers=hf.get("n_layers", 24), num_attention_heads=heads,
      intermediate_size=4 * d, hidden_act="gelu",
      hidden_dropout_prob=hf.get("resid_pdrop", 0.0),
      attention_probs_dropout_prob=attn.get("attn_pdrop", 0.0),
      max_position_embeddings=hf.get("max_seq_len", 2048), type_vocab_size=0,
      layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
      initializer_range=hf.get("initializer_range", 0.02),
      tie_word_embeddings=hf.get("tie_word_embeddings", True),
      causal=True, norm_position="pre", norm_bias=False, mlp_bias=False, attention_bias=False,
      position_embedding_type="alibi", **special_tokens_from_hf(hf))


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
  expect(cfg, "MPT", causal=True, norm_type="layernorm", norm_position="pre", norm_bias=False,
         embedding_norm=False, mlp_type="plain", mlp_bias=False, attention_bias=False,
         parallel_residual=False, sliding_window=None, position_embedding_type="alibi",
         hidden_act="gelu", intermediate_size=4 * cfg.hidden_size, num_key_value_heads=None,
         head_dim=None)
  if cfg.attention_out_bias:
    expect(cfg, "MPT", attention_out_bias=None)
  return {
      **common_to_hf(cfg, arch, "mpt"),
      "d_model": cfg.hidden_size, "n_heads": cfg.num_attention_heads,
      "n_layers": cfg.num_hidden_layers, "expansion_ratio": 4,
      "max_seq_len": cfg.max_position_embeddings, "layer_norm_epsilon": cfg.layer_norm_eps,
      "resid_pdrop": cfg.hidden_dropout_prob, "emb_pdrop": cfg.hidden_dropout_prob,
      "no_bias": True, "norm_type": "low_precision_layernorm",
      "attn_config": {
          "alibi": True, "alibi_bias_max": 8, "attn_impl": "torch",
          "attn_pdrop": cfg.attention_probs_dropout_prob,
          "attn_type": "multihead_attention", "attn_uses_sequence_id": False,
          "clip_qkv": None, "prefix_lm": False, "qk_ln": False, "softmax_scale": None,
      },
  }


def tensor_map(cfg: ModelConfig) -> TensorMap:
  D = cfg.hidden_size
  tm = TensorMap("transformer.")
  tm.rename("transformer.wte.weight", "model.embed.embedding")
  for i in range(cfg.num_hidden_layers):
    h, j = f"transformer.blocks.{i}", f"model.layers.{i}"
    tm.norm(f"{h}.norm_1", f"{j}.attn_norm", bias=False)
    tm.fused(f"{h}.attn.Wqkv.weight", [f"{j}.attn.{n}.kernel" for n in "qkv"],
             lambda w: qkv_split_blocks(w, [D] * 3, transpose=True),
             lambda ps: qkv_fuse_blocks(ps, transpose=True))
    tm.linear(f"{h}.attn.out_proj", f"{j}.attn.o", bias=False)
    tm.norm(f"{h}.norm_2", f"{j}.mlp_norm", bias=False)
    tm.linear(f"{h}.ffn.up_proj", f"{j}.mlp.up", bias=False)
    tm.linear(f"{h}.ffn.down_proj", f"{j}.mlp.down", bias=False)
  tm.norm("transformer.norm_f", "model.norm", bias=False)
  return tm.lm_head("lm_head", tied=cfg.tie_word_embeddings)


FAMILIES = (map_family("mpt", ("MptForCausalLM",), config_from_hf, config_to_hf,
                        tensor_map),)
