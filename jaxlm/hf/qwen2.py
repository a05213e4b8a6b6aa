"""Qwen2 (Qwen2ForCausalLM; also Qwen1.5 / Qwen2.5 checkpoints): Llama's block (RMSNorm,
SwiGLU MLP, RoPE, GQA) with biases on the q/k/v projections but none on o_proj or the MLP,
and an optional sliding window chosen per layer by `layer_types` ("full_attention" /
"sliding_attention"; when absent, derived from use_sliding_window and max_window_layers as
transformers does). jaxlm has one window for all layers, so only all-full and all-sliding
patterns load; a mixed one is refused naming `layer_types`."""

from __future__ import annotations

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError, DataError
from jaxlm.hf import llama
from jaxlm.hf.common import TensorMap, expect, map_family, rope_from_hf, special_tokens_from_hf

_CLASSES = ("Qwen2ForCausalLM",)
_FULL, _SLIDING = "full_attention", "sliding_attention"


def sliding_window_from_hf(hf: dict, layers: int) -> int | None:
  """The one window every layer uses (None: full attention), as Qwen2Config resolves it:
  `sliding_window` counts only with use_sliding_window, and `layer_types` defaults to
  sliding attention from layer max_window_layers on."""
  window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
  types = hf.get("layer_types")
  if types is None:
    start = hf.get("max_window_layers", 28)
    types = [_SLIDING if window is not None and i >= start else _FULL for i in range(layers)]
  if not isinstance(types, list) or len(types) != layers or not set(types) <= {_FULL, _SLIDING}:
    raise DataError(f"config.json: layer_types must list {_FULL!r} or {_SLIDING!r} for each "
                    f"of the {layers} layers, got {types!r}")
  if len(set(types)) > 1:
    raise DataError("config.json: layer_types mixes full and sliding attention; per-layer "
                    "attention patterns are not supported yet (jaxlm has one sliding_window "
                    "for all layers)")
  if types and types[0] == _SLIDING:
    if window is None:
      raise DataError("config.json: layer_types has sliding_attention layers but no window "
                      "(use_sliding_window is false or sliding_window is null)")
    return window
  return None


def config_from_hf(hf: dict) -> ModelConfig:
  heads = hf.get("num_attention_heads", 32)
  d = hf.get("hidden_size", 4096)
  layers = hf.get("num_hidden_layers", 32)
  rope = rope_from_hf(hf)
  if rope["partial_rotary_factor"] != 1.0:  # transformers' Qwen2 rotates every dim
    raise ConfigError(f"config.json: partial_rotary_factor={rope['partial_rotary_factor']} "
                      "is not supported for qwen2")
  return ModelConfig(
      model_type="qwen2", vocab_size=hf.get("vocab_size", 151936), hidden_size=d,
      num_hidden_layers=layers, num_attention_heads=heads,
      num_key_value_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or d // heads,
      intermediate_size=hf.get("intermediate_size", 22016),
      hidden_act=hf.get("hidden_act", "silu"), hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=hf.get("attention_dropout", 0.0),
      max_position_embeddings=hf.get("max_position_embeddings", 32768),
      type_vocab_size=0, layer_norm_eps=hf.get("rms_norm_eps", 1e-6),
      initializer_range=hf.get("initializer_range", 0.02),
      tie_word_embeddings=hf.get("tie_word_embeddings", False),
      causal=True, norm_type="rmsnorm", norm_position="pre", mlp_type="gated",
      mlp_bias=False, attention_bias=True, attention_out_bias=False,
      sliding_window=sliding_window_from_hf(hf, layers),
      position_embedding_type="rope", **rope, **special_tokens_from_hf(hf))


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
  expect(cfg, "Qwen2", causal=True, norm_type="rmsnorm", norm_position="pre",
         embedding_norm=False, mlp_type="gated", parallel_residual=False,
         position_embedding_type="rope", attention_bias=True, attention_out_bias=False,
         mlp_bias=False)
  window = cfg.sliding_window
  return {
      **llama.block_to_hf(cfg, arch, "qwen2"),
      "use_sliding_window": window is not None, "sliding_window": window,
      "layer_types": [_FULL if window is None else _SLIDING] * cfg.num_hidden_layers,
  }


def tensor_map(cfg: ModelConfig) -> TensorMap:
  """Llama's names and layouts: its map reads the q/k/v and o biases from the config."""
  return llama.tensor_map(cfg, _CLASSES[0])


FAMILIES = (map_family("qwen2", _CLASSES, config_from_hf, config_to_hf, tensor_map),)
