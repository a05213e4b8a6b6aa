"""Qwen2 (Qwen2ForCausalLM; also Qwen1.5 / Qwen2.5 checkpoints) and Qwen3
(Qwen3ForCausalLM): Llama's block (RMSNorm, SwiGLU MLP, RoPE, GQA) with
  - Qwen2: biases on the q/k/v projections but none on o_proj or the MLP;
  - Qwen3: q/k/v/o biases all or nothing (attention_bias, default off), an explicit
    head_dim (default 128), and an RMSNorm of each head's queries and keys before RoPE
    with one [head_dim] scale shared by the heads (model.qk_norm);
and, for both, a sliding window chosen per layer by `layer_types` ("full_attention" /
"sliding_attention"; when absent, derived from use_sliding_window and max_window_layers as
transformers does), mixed patterns included (ModelConfig.layer_types)."""

from __future__ import annotations

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.hf import llama
from jaxlm.hf.common import (TensorMap, expect, layer_types_from_hf, map_family, rope_from_hf,
                             special_tokens_from_hf)

_QWEN2, _QWEN3 = "Qwen2ForCausalLM", "Qwen3ForCausalLM"
_FULL, _SLIDING = "full_attention", "sliding_attention"


def attention_pattern_from_hf(hf: dict, layers: int) -> dict:
  """ModelConfig's sliding_window and layer_types as Qwen2Config / Qwen3Config resolve
  them: `sliding_window` counts only with use_sliding_window, and `layer_types` defaults to
  sliding attention from layer max_window_layers on. A uniform pattern needs no
  layer_types (one window, or none, for every layer)."""
  window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
  start = hf.get("max_window_layers", 28)
  types = layer_types_from_hf(hf, layers, [
      _SLIDING if window is not None and i >= start else _FULL for i in range(layers)])
  if _SLIDING not in types:
    return dict(sliding_window=None, layer_types=None)
  if window is None:  # transformers fails building this model's masks
    raise ConfigError("config.json: layer_types has sliding_attention layers but no window "
                      "(use_sliding_window is false or sliding_window is null)")
  return dict(sliding_window=window, layer_types=None if _FULL not in types else types)


def attention_pattern_to_hf(cfg: ModelConfig) -> dict:
  windows = cfg.layer_windows()
  window = cfg.sliding_window if any(w is not None for w in windows) else None
  return {"use_sliding_window": window is not None, "sliding_window": window,
          "layer_types": [_FULL if w is None else _SLIDING for w in windows]}


def config_from_hf(hf: dict) -> ModelConfig:
  qwen3 = hf.get("model_type") == "qwen3" or _QWEN3 in (hf.get("architectures") or [])
  heads = hf.get("num_attention_heads", 32)
  d = hf.get("hidden_size", 4096)
  layers = hf.get("num_hidden_layers", 32)
  rope = rope_from_hf(hf)
  if rope["partial_rotary_factor"] != 1.0:  # transformers' Qwen2/3 rotate every dim
    raise ConfigError(f"config.json: partial_rotary_factor={rope['partial_rotary_factor']} "
                      f"is not supported for {'qwen3' if qwen3 else 'qwen2'}")
  if qwen3:  # Qwen3Config's head_dim defaults to 128, not hidden_size / heads
    bias = hf.get("attention_bias", False)
    kw = dict(head_dim=hf.get("head_dim", 128), attention_bias=bias, attention_out_bias=bias,
              qk_norm="rmsnorm", intermediate_size=hf.get("intermediate_size", 22016))
  else:
    kw = dict(head_dim=hf.get("head_dim") or d // heads, attention_bias=True,
              attention_out_bias=False, intermediate_size=hf.get("intermediate_size", 22016))
  return ModelConfig(
      model_type="qwen3" if qwen3 else "qwen2", vocab_size=hf.get("vocab_size", 151936),
      hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
      num_key_value_heads=hf.get("num_key_value_heads") or heads,
      hidden_act=hf.get("hidden_act", "silu"), hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=hf.get("attention_dropout", 0.0),
      max_position_embeddings=hf.get("max_position_embeddings", 32768),
      type_vocab_size=0, layer_norm_eps=hf.get("rms_norm_eps", 1e-6),
      initializer_range=hf.get("initializer_range", 0.02),
      tie_word_embeddings=hf.get("tie_word_embeddings", False),
      causal=True, norm_type="rmsnorm", norm_position="pre", mlp_type="gated",
      mlp_bias=False, position_embedding_type="rope",
      **attention_pattern_from_hf(hf, layers), **kw, **rope, **special_tokens_from_hf(hf))


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
  qwen3 = arch == _QWEN3
  name = "Qwen3" if qwen3 else "Qwen2"
  expect(cfg, name, causal=True, norm_type="rmsnorm", norm_position="pre",
         embedding_norm=False, mlp_type="gated", parallel_residual=False,
         position_embedding_type="rope", mlp_bias=False)
  if qwen3:
    expect(cfg, name, qk_norm="rmsnorm")
    if cfg.attention_out_bias not in (None, cfg.attention_bias):
      expect(cfg, name, attention_out_bias=cfg.attention_bias)
  else:
    expect(cfg, name, attention_bias=True, attention_out_bias=False)
  features = ("layer_types", "qk_norm") if qwen3 else ("layer_types",)
  out = {**llama.block_to_hf(cfg, arch, name.lower(), features),
         **attention_pattern_to_hf(cfg)}
  if qwen3:
    out["attention_bias"] = cfg.attention_bias
  return out


def tensor_map(cfg: ModelConfig) -> TensorMap:
  """Llama's names and layouts: its map reads the q/k/v and o biases and the q/k norms
  from the config."""
  return llama.tensor_map(cfg, _QWEN2)


FAMILIES = (map_family("qwen2", (_QWEN2, _QWEN3), config_from_hf, config_to_hf, tensor_map),)
