"""Gemma (GemmaForCausalLM) and Gemma 2 (Gemma2ForCausalLM): Llama's block and tensor
names with
  - RMSNorm weights stored around 0 and applied as (1 + w), in float32;
  - token embeddings times sqrt(hidden_size) (the constant rounded to the compute dtype);
  - a GeGLU MLP with tanh-approximated GELU (Gemma's legacy hidden_act "gelu" means that);
  - head_dim independent of hidden_size / heads; a tied head by default;
and for Gemma 2 also
  - four norms per block: the attention and MLP outputs are normed before the residual
    add (HF's post_attention_layernorm is the attention output's norm here);
  - attention logits scaled by query_pre_attn_scalar**-0.5 and soft-capped,
    cap * tanh(s / cap) (attn_logit_softcapping), and so are the final logits
    (final_logit_softcapping);
  - sliding-window and global layers from layer_types (alternating by default).
Gemma 3 options (per-layer-type RoPE, rope_local_base_freq, sliding_window_pattern) and
bidirectional attention are refused, naming the key.
"""

from __future__ import annotations

from jaxlm.config import LAYER_TYPES, ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.hf import llama
from jaxlm.hf.common import TensorMap, expect, map_family, rope_from_hf

_GEMMA, _GEMMA2 = "GemmaForCausalLM", "Gemma2ForCausalLM"
_FEATURES = ("norm_scale_offset", "scale_embeddings")  # common.OPTIONAL_FIELDS both use
_FEATURES2 = _FEATURES + ("sandwich_norm", "layer_types", "query_pre_attn_scalar",
                          "attn_logit_softcapping", "final_logit_softcapping")


def _is_gemma2(hf: dict) -> bool:
  return hf.get("model_type") == "gemma2" or _GEMMA2 in (hf.get("architectures") or [])


def _refuse_unsupported(hf: dict, gemma2: bool) -> None:
  """Options transformers' Gemma / Gemma 2 would honour (or that belong to Gemma 3) but
  jaxlm does not implement: a one-line error naming the key, never a silent default."""
  if hf.get("use_bidirectional_attention"):
    raise ConfigError("config.json: use_bidirectional_attention=True is not supported "
                      "(jaxlm's Gemma is a causal LM)")
  for key in ("rope_local_base_freq", "sliding_window_pattern"):
    # Gemma 2 alternates layers, as sliding_window_pattern=2 says; anything else is Gemma 3.
    if hf.get(key) is not None and not (gemma2 and key == "sliding_window_pattern"
                                        and hf[key] == 2):
      raise ConfigError(f"config.json: {key}={hf[key]!r} is a Gemma 3 option, not supported "
                        f"for {'gemma2' if gemma2 else 'gemma'}")
  params = hf.get("rope_parameters") or {}
  if set(params) & set(LAYER_TYPES):  # Gemma 3's RoPE per layer type
    raise ConfigError("config.json: rope_parameters per layer type (Gemma 3) is not "
                      "supported for Gemma / Gemma 2; give one rope_parameters dict")


def _activation(hf: dict, gemma2: bool) -> str:
  """transformers 5's choice: Gemma 2's MLP reads hidden_activation (hidden_act is not
  used); Gemma's reads hidden_act and maps the released configs' "gelu" to the tanh GELU
  the model was trained with (hidden_activation is not used)."""
  if gemma2:
    return hf.get("hidden_activation") or "gelu_pytorch_tanh"
  act = hf.get("hidden_act", "gelu_pytorch_tanh")
  return "gelu_pytorch_tanh" if act == "gelu" else act


def _layer_types(hf: dict, layers: int) -> list[str]:
  """Gemma2Config's default: sliding attention on even layers (0, 2, ...)."""
  types = hf.get("layer_types")
  if types is None:
    return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
  if not isinstance(types, list) or len(types) != layers or not set(types) <= set(LAYER_TYPES):
    raise ConfigError(f"config.json: layer_types must list one of {LAYER_TYPES} for each of "
                      f"the {layers} layers, got {types!r}")
  return types


def config_from_hf(hf: dict) -> ModelConfig:
  gemma2 = _is_gemma2(hf)
  _refuse_unsupported(hf, gemma2)
  rope = rope_from_hf(hf)
  if rope["partial_rotary_factor"] != 1.0:  # transformers' Gemma rotates every dim
    raise ConfigError(f"config.json: partial_rotary_factor={rope['partial_rotary_factor']} "
                      f"is not supported for {'gemma2' if gemma2 else 'gemma'}")
  layers = hf.get("num_hidden_layers", 26 if gemma2 else 28)
  heads = hf.get("num_attention_heads", 8 if gemma2 else 16)
  bias = hf.get("attention_bias", False)  # q, k, v and o alike
  kw = {}
  if gemma2:
    types = _layer_types(hf, layers)
    kw = dict(sandwich_norm=True, layer_types=types,
              sliding_window=hf.get("sliding_window", 4096) if "sliding_attention" in types
              else None,
              query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
              attn_logit_softcapping=hf.get("attn_logit_softcapping", 50.0),
              final_logit_softcapping=hf.get("final_logit_softcapping", 30.0))
  return ModelConfig(
      model_type="gemma2" if gemma2 else "gemma",
      vocab_size=hf.get("vocab_size", 256000),
      hidden_size=hf.get("hidden_size", 2304 if gemma2 else 3072),
      num_hidden_layers=layers, num_attention_heads=heads,
      num_key_value_heads=hf.get("num_key_value_heads", 4 if gemma2 else 16) or heads,
      head_dim=hf.get("head_dim", 256),
      intermediate_size=hf.get("intermediate_size", 9216 if gemma2 else 24576),
      hidden_act=_activation(hf, gemma2), hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=hf.get("attention_dropout", 0.0),
      max_position_embeddings=hf.get("max_position_embeddings", 8192),
      type_vocab_size=0, layer_norm_eps=hf.get("rms_norm_eps", 1e-6),
      initializer_range=hf.get("initializer_range", 0.02),
      tie_word_embeddings=hf.get("tie_word_embeddings", True),
      causal=True, norm_type="rmsnorm", norm_position="pre", norm_scale_offset=1.0,
      scale_embeddings=True, mlp_type="gated", mlp_bias=False,
      attention_bias=bias, attention_out_bias=bias, position_embedding_type="rope",
      pad_token_id=hf.get("pad_token_id", 0), bos_token_id=hf.get("bos_token_id", 2),
      eos_token_id=hf.get("eos_token_id", 1), **rope, **kw)


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
  gemma2 = arch == _GEMMA2
  name = "Gemma2" if gemma2 else "Gemma"
  expect(cfg, name, causal=True, norm_type="rmsnorm", norm_position="pre",
         norm_scale_offset=1.0, scale_embeddings=True, embedding_norm=False,
         mlp_type="gated", mlp_bias=False, parallel_residual=False,
         position_embedding_type="rope", sandwich_norm=gemma2)
  if cfg.attention_out_bias not in (None, cfg.attention_bias):
    expect(cfg, name, attention_out_bias=cfg.attention_bias)
  out = {**llama.block_to_hf(cfg, arch, name.lower(), _FEATURES2 if gemma2 else _FEATURES),
         "attention_bias": cfg.attention_bias}
  if not gemma2:
    expect(cfg, name, sliding_window=None)
    if cfg.hidden_act == "gelu":  # GemmaConfig would read it as the tanh GELU
      raise ConfigError("model.hidden_act='gelu' (exact) cannot be saved as Gemma "
                        "(transformers reads a Gemma 'gelu' as the tanh approximation)")
    return out
  window = cfg.sliding_window
  del out["hidden_act"]  # Gemma2Config reads hidden_activation only
  return {**out, "hidden_activation": cfg.hidden_act, "sliding_window": window,
          "layer_types": cfg.layer_types or [
              "full_attention" if window is None else "sliding_attention"] * cfg.num_hidden_layers,
          "query_pre_attn_scalar": cfg.query_pre_attn_scalar or cfg.head_size,
          "attn_logit_softcapping": cfg.attn_logit_softcapping,
          "final_logit_softcapping": cfg.final_logit_softcapping}


def tensor_map(cfg: ModelConfig) -> TensorMap:
  """Llama's names; with sandwich_norm (Gemma 2) its map names the four norms."""
  return llama.tensor_map(cfg, _GEMMA2 if cfg.sandwich_norm else _GEMMA)


FAMILIES = (map_family("gemma", (_GEMMA, _GEMMA2), config_from_hf, config_to_hf, tensor_map),)
