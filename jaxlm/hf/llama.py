"""Llama (LlamaForCausalLM) and Mistral (MistralForCausalLM): RMSNorm, SwiGLU MLP, RoPE
(optionally linear / llama3 scaled), GQA; Mistral adds a sliding attention window. Separate
q/k/v/o projections, so the tensor map is a plain rename with transposes. The
*ForSequenceClassification classes swap the LM head for `score` (bias-free, num_labels
outputs); their labels travel in config.json."""

from __future__ import annotations

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.hf.common import (TensorMap, common_to_hf, expect, labels_from_hf, labels_to_hf,
                             map_family, rope_from_hf, rope_to_hf, special_tokens_from_hf)

_MISTRAL = "MistralForCausalLM"
_CLASSES = ("LlamaForCausalLM", _MISTRAL, "LlamaForSequenceClassification",
            "MistralForSequenceClassification")


def config_from_hf(hf: dict) -> ModelConfig:
  mistral = hf.get("model_type") == "mistral" or any(
      a.startswith("Mistral") for a in hf.get("architectures") or [])
  heads = hf.get("num_attention_heads", 32)
  d = hf.get("hidden_size", 4096)
  bias = False if mistral else hf.get("attention_bias", False)
  rope = rope_from_hf(hf)
  if rope["partial_rotary_factor"] != 1.0:  # transformers' Llama/Mistral rotate every dim
    raise ConfigError(f"config.json: partial_rotary_factor={rope['partial_rotary_factor']} "
                      f"is not supported for {hf.get('model_type')}")
  return ModelConfig(
      model_type="mistral" if mistral else "llama", vocab_size=hf.get("vocab_size", 32000),
      hidden_size=d, num_hidden_layers=hf.get("num_hidden_layers", 32),
      num_attention_heads=heads,
      num_key_value_heads=hf.get("num_key_value_heads", 8 if mistral else None) or heads,
      head_dim=hf.get("head_dim") or d // heads,
      intermediate_size=hf.get("intermediate_size", 14336 if mistral else 11008),
      hidden_act=hf.get("hidden_act", "silu"), hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=hf.get("attention_dropout", 0.0),
      max_position_embeddings=hf.get("max_position_embeddings", 4096 * 32 if mistral else 2048),
      type_vocab_size=0, layer_norm_eps=hf.get("rms_norm_eps", 1e-6),
      initializer_range=hf.get("initializer_range", 0.02),
      tie_word_embeddings=hf.get("tie_word_embeddings", False),
      causal=True, norm_type="rmsnorm", norm_position="pre", mlp_type="gated",
      mlp_bias=False if mistral else hf.get("mlp_bias", False),
      attention_bias=bias, attention_out_bias=bias,
      sliding_window=hf.get("sliding_window", 4096) if mistral else None,
      position_embedding_type="rope", **rope, **special_tokens_from_hf(hf),
      **labels_from_hf(hf))


def block_to_hf(cfg: ModelConfig, arch: str, model_type: str, features=(), *,
                with_partial: bool = False, longrope: bool = False) -> dict:
  """The config.json keys of a Llama-style block (Llama, Mistral, Qwen2, Qwen3, Gemma, Phi-3);
  `features`: the common.OPTIONAL_FIELDS the family expresses; `with_partial`,
  `longrope`: the family writes partial_rotary_factor / takes longrope scaling."""
  return {
      **common_to_hf(cfg, arch, model_type, features=features),
      "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
      "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.kv_heads,
      "head_dim": cfg.head_size, "intermediate_size": cfg.intermediate_size,
      "hidden_act": cfg.hidden_act, "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.layer_norm_eps,
      "attention_dropout": cfg.attention_probs_dropout_prob,
      "rope_parameters": rope_to_hf(cfg, with_partial=with_partial, longrope=longrope),
  }


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
  mistral = arch.startswith("Mistral")
  name = "Mistral" if mistral else "Llama"
  expect(cfg, name, causal=True, norm_type="rmsnorm", norm_position="pre",
         embedding_norm=False, mlp_type="gated", parallel_residual=False,
         position_embedding_type="rope")
  if mistral:
    expect(cfg, name, attention_bias=False, mlp_bias=False)
  else:
    expect(cfg, name, sliding_window=None)
  if cfg.attention_out_bias not in (None, cfg.attention_bias):
    expect(cfg, name, attention_out_bias=cfg.attention_bias)
  out = {**block_to_hf(cfg, arch, "mistral" if mistral else "llama"), **labels_to_hf(cfg)}
  if mistral:
    out["sliding_window"] = cfg.sliding_window
  else:
    out.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias, pretraining_tp=1)
  return out


# HF names of a block's norms -> jaxlm's. With sandwich_norm (Gemma 2) HF's
# post_attention_layernorm is the attention output's norm, no longer the MLP's input norm.
_NORMS = {False: (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")),
          True: (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "attn_out_norm"),
                 ("pre_feedforward_layernorm", "mlp_norm"),
                 ("post_feedforward_layernorm", "mlp_out_norm"))}


def tensor_map(cfg: ModelConfig, arch: str) -> TensorMap:
  # rotary_emb.inv_freq: a buffer that older checkpoints saved; recomputed from the config.
  tm = TensorMap("model.", ignore=[r"\.rotary_emb\.inv_freq$"])
  tm.rename("model.embed_tokens.weight", "model.embed.embedding")
  for i in range(cfg.num_hidden_layers):
    h, j = f"model.layers.{i}", f"model.layers.{i}"
    # parallel_shared_norm (Cohere): input_layernorm alone feeds attention and MLP
    for hf_name, jax_name in _NORMS[cfg.sandwich_norm][:1 if cfg.parallel_shared_norm else None]:
      tm.norm(f"{h}.{hf_name}", f"{j}.{jax_name}", bias=False)
    for hf_name, jax_name in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
      tm.linear(f"{h}.self_attn.{hf_name}", f"{j}.attn.{jax_name}", bias=cfg.attention_bias)
    if cfg.qk_norm is not None:  # per-head query / key norms (model.qk_norm)
      for n in "qk":
        tm.norm(f"{h}.self_attn.{n}_norm", f"{j}.attn.{n}_norm", bias=False)
    out_bias = cfg.attention_bias if cfg.attention_out_bias is None else cfg.attention_out_bias
    tm.linear(f"{h}.self_attn.o_proj", f"{j}.attn.o", bias=out_bias)
    for hf_name, jax_name in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
      tm.linear(f"{h}.mlp.{hf_name}", f"{j}.mlp.{jax_name}", bias=cfg.mlp_bias)
  tm.norm("model.norm", "model.norm", bias=False)
  if arch.endswith("ForSequenceClassification"):
    return tm.linear("score", "score", bias=False)
  return tm.lm_head("lm_head", tied=cfg.tie_word_embeddings)


FAMILIES = (map_family("llama", _CLASSES, config_from_hf, config_to_hf, tensor_map,
                       per_class=True),)
