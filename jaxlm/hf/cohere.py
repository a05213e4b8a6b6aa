"""Cohere Command-R (CohereForCausalLM): Llama's tensor names and SwiGLU MLP with
  - a parallel block with ONE bias-free LayerNorm (float32, eps layer_norm_eps):
    x + attn(ln x) + mlp(ln x) (parallel_shared_norm);
  - interleaved RoPE: dims (2i, 2i+1) rotate together (rope_interleaved);
  - optional q/k LayerNorms with a scale per head (use_qk_norm -> qk_norm="layernorm");
  - LM logits times logit_scale; a tied head by default; attention_bias on q, k, v and o.
"""

from __future__ import annotations

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.hf import llama
from jaxlm.hf.common import TensorMap, expect, map_family, rope_from_hf

_ARCH = "CohereForCausalLM"
# common.OPTIONAL_FIELDS Cohere expresses
_FEATURES = ("parallel_shared_norm", "rope_interleaved", "logit_scale", "qk_norm")


def config_from_hf(hf: dict) -> ModelConfig:
  rope = rope_from_hf(hf, default_theta=500000.0)  # CohereConfig.default_theta
  if rope["partial_rotary_factor"] != 1.0:  # transformers' Cohere rotates every dim
    raise ConfigError(f"config.json: partial_rotary_factor={rope['partial_rotary_factor']} "
                      "is not supported for cohere")
  scale = hf.get("logit_scale", 0.0625)
  if isinstance(scale, bool) or not isinstance(scale, (int, float)):
    raise ConfigError(f"config.json: logit_scale={scale!r} is not supported (a number; "
                      "transformers multiplies the logits by it)")
  d = hf.get("hidden_size", 8192)
  heads = hf.get("num_attention_heads", 64)
  bias = hf.get("attention_bias", False)  # q, k, v and o alike
  return ModelConfig(
      model_type="cohere", vocab_size=hf.get("vocab_size", 256000), hidden_size=d,
      num_hidden_layers=hf.get("num_hidden_layers", 40), num_attention_heads=heads,
      num_key_value_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or d // heads,
      intermediate_size=hf.get("intermediate_size", 22528),
      hidden_act=hf.get("hidden_act", "silu"), hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=hf.get("attention_dropout", 0.0),
      max_position_embeddings=hf.get("max_position_embeddings", 8192), type_vocab_size=0,
      layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
      initializer_range=hf.get("initializer_range", 0.02),
      tie_word_embeddings=hf.get("tie_word_embeddings", True),
      causal=True, norm_type="layernorm", norm_bias=False, norm_position="pre",
      parallel_residual=True, parallel_shared_norm=True, mlp_type="gated", mlp_bias=False,
      attention_bias=bias, attention_out_bias=bias, position_embedding_type="rope",
      rope_interleaved=True, qk_norm="layernorm" if hf.get("use_qk_norm") else None,
      logit_scale=float(scale), pad_token_id=hf.get("pad_token_id", 0),
      bos_token_id=hf.get("bos_token_id", 5), eos_token_id=hf.get("eos_token_id", 255001),
      **rope)


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
  expect(cfg, "Cohere", causal=True, norm_type="layernorm", norm_bias=False,
         norm_position="pre", embedding_norm=False, parallel_residual=True,
         parallel_shared_norm=True, mlp_type="gated", mlp_bias=False, sliding_window=None,
         position_embedding_type="rope", rope_interleaved=True)
  if cfg.qk_norm is not None:
    expect(cfg, "Cohere", qk_norm="layernorm")
  if cfg.attention_out_bias not in (None, cfg.attention_bias):
    expect(cfg, "Cohere", attention_out_bias=cfg.attention_bias)
  out = llama.block_to_hf(cfg, arch, "cohere", _FEATURES)
  del out["rms_norm_eps"]  # CohereConfig: layer_norm_eps
  return {**out, "layer_norm_eps": cfg.layer_norm_eps, "attention_bias": cfg.attention_bias,
          "use_qk_norm": cfg.qk_norm is not None,
          "logit_scale": 1.0 if cfg.logit_scale is None else cfg.logit_scale}


def tensor_map(cfg: ModelConfig) -> TensorMap:
  """Llama's names; with parallel_shared_norm its map names input_layernorm only, and
  the q/k norms self_attn.q_norm / k_norm ([heads, head_dim] weights)."""
  return llama.tensor_map(cfg, _ARCH)


FAMILIES = (map_family("cohere", (_ARCH,), config_from_hf, config_to_hf, tensor_map),)
