"""GPT-2 (GPT2LMHeadModel, GPT2ForSequenceClassification): pre-LN, learned positions,
Conv1D weights stored [in, out] with a fused [q | k | v] c_attn, LM head tied to wte; the
classifier's `score` is a torch Linear (bias-free, num_labels outputs)."""

from __future__ import annotations

from jaxlm.config import ModelConfig
from jaxlm.hf.common import (TensorMap, common_to_hf, expect, labels_from_hf, labels_to_hf,
                             map_family, qkv_fuse_blocks, qkv_split_blocks, require,
                             special_tokens_from_hf)


def config_from_hf(hf: dict) -> ModelConfig:
  require(hf, "scale_attn_weights", lambda v: v is True, True, "attention is always scaled")
  require(hf, "scale_attn_by_inverse_layer_idx", lambda v: not v, False, "no per-layer scaling")
  require(hf, "reorder_and_upcast_attn", lambda v: not v, False, "fp32 attention already")
  require(hf, "add_cross_attention", lambda v: not v, False, "decoder-only")
  d = hf.get("n_embd", 768)
  return ModelConfig(
      model_type="gpt2", vocab_size=hf.get("vocab_size", 50257), hidden_size=d,
      num_hidden_layers=hf.get("n_layer", 12), num_attention_heads=hf.get("n_head", 12),
      intermediate_size=hf.get("n_inner") or 4 * d,
      hidden_act=hf.get("activation_function", "gelu_new"),
      hidden_dropout_prob=hf.get("resid_pdrop", 0.1),
      attention_probs_dropout_prob=hf.get("attn_pdrop", 0.1),
      max_position_embeddings=hf.get("n_positions", 1024), type_vocab_size=0,
      layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
      initializer_range=hf.get("initializer_range", 0.02),
      tie_word_embeddings=hf.get("tie_word_embeddings", True),
      causal=True, norm_position="pre", position_embedding_type="absolute",
      **{**special_tokens_from_hf(hf), "bos_token_id": hf.get("bos_token_id", 50256),
         "eos_token_id": hf.get("eos_token_id", 50256)}, **labels_from_hf(hf))


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
  expect(cfg, "GPT-2", causal=True, norm_type="layernorm", norm_position="pre", norm_bias=True,
         embedding_norm=False, mlp_type="plain", mlp_bias=True, attention_bias=True,
         parallel_residual=False, sliding_window=None, position_embedding_type="absolute",
         num_key_value_heads=None, head_dim=None)
  if cfg.attention_out_bias is False:
    expect(cfg, "GPT-2", attention_out_bias=None)
  return {
      **common_to_hf(cfg, arch, "gpt2"),
      "n_embd": cfg.hidden_size, "n_layer": cfg.num_hidden_layers,
      "n_head": cfg.num_attention_heads,
      "n_inner": None if cfg.intermediate_size == 4 * cfg.hidden_size else cfg.intermediate_size,
      "n_positions": cfg.max_position_embeddings, "activation_function": cfg.hidden_act,
      "resid_pdrop": cfg.hidden_dropout_prob, "embd_pdrop": cfg.hidden_dropout_prob,
      "attn_pdrop": cfg.attention_probs_dropout_prob,
      "layer_norm_epsilon": cfg.layer_norm_eps, "scale_attn_weights": True,
      **labels_to_hf(cfg),
  }


def tensor_map(cfg: ModelConfig, arch: str) -> TensorMap:
  D = cfg.hidden_size
  # Conv1D weights are already [in, out], like jaxlm kernels: no transposes anywhere.
  # attn.bias / attn.masked_bias: causal-mask buffers that old checkpoints saved.
  tm = TensorMap("transformer.", ignore=[r"\.attn\.(masked_)?bias$"])
  tm.rename("transformer.wte.weight", "model.embed.embedding")
  tm.rename("transformer.wpe.weight", "model.position.embedding")
  for i in range(cfg.num_hidden_layers):
    h, j = f"transformer.h.{i}", f"model.layers.{i}"
    tm.norm(f"{h}.ln_1", f"{j}.attn_norm", bias=True)
    for part in ("weight", "bias"):
      jp = "kernel" if part == "weight" else "bias"
      tm.fused(f"{h}.attn.c_attn.{part}", [f"{j}.attn.{n}.{jp}" for n in "qkv"],
               lambda w: qkv_split_blocks(w, [D] * 3, transpose=False),
               lambda ps: qkv_fuse_blocks(ps, transpose=False))
    tm.rename(f"{h}.attn.c_proj.weight", f"{j}.attn.o.kernel")
    tm.rename(f"{h}.attn.c_proj.bias", f"{j}.attn.o.bias")
    tm.norm(f"{h}.ln_2", f"{j}.mlp_norm", bias=True)
    tm.rename(f"{h}.mlp.c_fc.weight", f"{j}.mlp.up.kernel")
    tm.rename(f"{h}.mlp.c_fc.bias", f"{j}.mlp.up.bias")
    tm.rename(f"{h}.mlp.c_proj.weight", f"{j}.mlp.down.kernel")
    tm.rename(f"{h}.mlp.c_proj.bias", f"{j}.mlp.down.bias")
  tm.norm("transformer.ln_f", "model.norm", bias=True)
  if arch == "GPT2ForSequenceClassification":
    return tm.linear("score", "score", bias=False)
  return tm.lm_head("lm_head", tied=cfg.tie_word_embeddings)


FAMILIES = (map_family("gpt2", ("GPT2LMHeadModel", "GPT2ForSequenceClassification"),
                       config_from_hf, config_to_hf, tensor_map, per_class=True),)
