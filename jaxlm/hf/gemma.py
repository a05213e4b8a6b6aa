"""Gemma (GemmaForCausalLM), Gemma 2 (Gemma2ForCausalLM) and Gemma 3's text model
(Gemma3ForCausalLM, model_type gemma3_text): Llama's block and tensor names with
  - RMSNorm weights stored around 0 and applied as (1 + w), in float32;
  - token embeddings times sqrt(hidden_size) (the constant rounded to the compute dtype);
  - a GeGLU MLP with tanh-approximated GELU (Gemma's legacy hidden_act "gelu" means that);
  - head_dim independent of hidden_size / heads; a tied head by default;
for Gemma 2 and 3 also
  - four norms per block: the attention and MLP outputs are normed before the residual
    add (HF's post_attention_layernorm is the attention output's norm here);
  - attention logits scaled by query_pre_attn_scalar**-0.5; the final logits soft-capped,
    cap * tanh(s / cap) (final_logit_softcapping; Gemma 3's default: none);
  - sliding-window and global layers from layer_types (Gemma 2 alternates by default,
    Gemma 3 makes every sliding_window_pattern-th layer global, default 6);
for Gemma 2 the attention logits soft-capped too (attn_logit_softcapping); and for Gemma 3
  - a (1 + w) RMSNorm of each head's queries and keys before RoPE (model.qk_norm);
  - RoPE per layer type: the global layers rotate with rope_theta (default 1e6) and its
    scaling, the sliding ones with rope_local_base_freq (default 1e4) unscaled, spelled
    either as transformers 5's rope_parameters per layer type or the Hub's legacy keys.
Bidirectional attention, a Gemma 3 attn_logit_softcapping (transformers' Gemma 3 keeps the
key but never applies it) and Gemma 3 keys in a Gemma / Gemma 2 config are refused, naming
the key.
"""

from __future__ import annotations

from jaxlm.config import LAYER_TYPES, ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.hf import llama
from jaxlm.hf.common import TensorMap, expect, layer_types_from_hf, map_family, rope_from_hf

_GEMMA, _GEMMA2, _GEMMA3 = "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"
_MODEL_TYPES = {1: "gemma", 2: "gemma2", 3: "gemma3_text"}
_FEATURES = {1: ("norm_scale_offset", "scale_embeddings")}  # common.OPTIONAL_FIELDS used
_FEATURES[2] = _FEATURES[1] + ("sandwich_norm", "layer_types", "query_pre_attn_scalar",
                               "attn_logit_softcapping", "final_logit_softcapping")
_FEATURES[3] = _FEATURES[1] + ("sandwich_norm", "layer_types", "query_pre_attn_scalar",
                               "final_logit_softcapping", "qk_norm", "rope_local_base_freq")
# Each config class's defaults for the keys a config.json may leave out.
_DEFAULTS = {
    1: dict(vocab_size=256000, hidden_size=3072, num_hidden_layers=28, num_attention_heads=16,
            num_key_value_heads=16, intermediate_size=24576, max_position_embeddings=8192),
    2: dict(vocab_size=256000, hidden_size=2304, num_hidden_layers=26, num_attention_heads=8,
            num_key_value_heads=4, intermediate_size=9216, max_position_embeddings=8192),
    3: dict(vocab_size=262208, hidden_size=2304, num_hidden_layers=26, num_attention_heads=8,
            num_key_value_heads=4, intermediate_size=9216, max_position_embeddings=131072),
}


def _version(hf: dict) -> int:
  archs = hf.get("architectures") or []
  if hf.get("model_type") == "gemma3_text" or _GEMMA3 in archs:
    return 3
  return 2 if hf.get("model_type") == "gemma2" or _GEMMA2 in archs else 1


def _refuse_unsupported(hf: dict, version: int) -> None:
  """Options transformers' Gemma classes would honour (or that belong to another Gemma)
  but jaxlm does not implement: a one-line error naming the key, never a silent default."""
  name = _MODEL_TYPES[version]
  if hf.get("use_bidirectional_attention"):
    raise ConfigError("config.json: use_bidirectional_attention=True is not supported "
                      "(jaxlm's Gemma is a causal LM)")
  if version == 3:
    if hf.get("attn_logit_softcapping") is not None:
      raise ConfigError(f"config.json: attn_logit_softcapping={hf['attn_logit_softcapping']!r} "
                        "is not supported for gemma3_text (transformers' Gemma 3 never applies "
                        "it, so its meaning is ambiguous); set it to null")
    return
  for key in ("rope_local_base_freq", "sliding_window_pattern"):
    # Gemma 2 alternates layers, as sliding_window_pattern=2 says; anything else is Gemma 3.
    if hf.get(key) is not None and not (version == 2 and key == "sliding_window_pattern"
                                        and hf[key] == 2):
      raise ConfigError(f"config.json: {key}={hf[key]!r} is a Gemma 3 option, not supported "
                        f"for {name}")
  params = hf.get("rope_parameters") or {}
  if set(params) & set(LAYER_TYPES):  # Gemma 3's RoPE per layer type
    raise ConfigError("config.json: rope_parameters per layer type (Gemma 3) is not "
                      "supported for Gemma / Gemma 2; give one rope_parameters dict")


def _activation(hf: dict, version: int) -> str:
  """transformers 5's choice: Gemma 2 and 3's MLP read hidden_activation (hidden_act is
  not used); Gemma's reads hidden_act and maps the released configs' "gelu" to the tanh
  GELU the model was trained with (hidden_activation is not used)."""
  if version > 1:
    return hf.get("hidden_activation") or "gelu_pytorch_tanh"
  act = hf.get("hidden_act", "gelu_pytorch_tanh")
  return "gelu_pytorch_tanh" if act == "gelu" else act


def _gemma3_rope(hf: dict, max_positions: int) -> dict:
  """ModelConfig RoPE fields of a Gemma 3 config, as Gemma3TextConfig resolves them: v5's
  rope_parameters {"full_attention": {...}, "sliding_attention": {...}}, with the legacy
  rope_theta, rope_scaling (both the global layers') and rope_local_base_freq filling in."""
  params = hf.get("rope_parameters") or {}
  if not isinstance(params, dict) or not set(params) <= set(LAYER_TYPES):
    raise ConfigError("config.json: rope_parameters of gemma3_text must be a dict per layer "
                      f"type {LAYER_TYPES} (transformers ignores any other key), got {params!r}")
  full = dict(params.get("full_attention") or {"rope_type": "default"})
  scaling = hf.get("rope_scaling") or {}
  if "type" in scaling and "rope_type" not in scaling:  # would not replace full's rope_type
    raise ConfigError(f"config.json: rope_scaling={scaling!r} for gemma3_text must name its "
                      "kind as 'rope_type' (transformers' Gemma 3 ignores 'type' there)")
  full.update(scaling)
  full.setdefault("rope_theta", hf.get("rope_theta", 1e6))
  local = dict(params.get("sliding_attention") or {"rope_type": "default"})
  local.setdefault("rope_theta", hf.get("rope_local_base_freq", 1e4))
  rope = rope_from_hf({"rope_parameters": full, "max_position_embeddings": max_positions})
  if local == full:  # every layer rotates alike
    return {**rope, "rope_local_base_freq": None}
  if set(local) - {"rope_type", "rope_theta"} or local.get("rope_type") != "default":
    raise ConfigError(f"config.json: rope_parameters.sliding_attention={local!r} is not "
                      "supported (jaxlm's sliding layers rotate with a plain rope_theta, or "
                      "exactly as the full_attention layers)")
  return {**rope, "rope_local_base_freq": float(local["rope_theta"])}


def layer_pattern(layers: int, period: int) -> list[str]:
  """Gemma 2 / 3's default layer_types: every `period`-th layer global, the others sliding
  (Gemma2Config: period 2; Gemma3TextConfig: sliding_window_pattern, default 6)."""
  return ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(layers)]


def _layer_types(hf: dict, version: int, layers: int) -> list[str]:
  period = 2 if version == 2 else hf.get("sliding_window_pattern", 6)
  if not isinstance(period, int) or isinstance(period, bool) or period < 1:
    raise ConfigError(f"config.json: sliding_window_pattern must be a positive integer, "
                      f"got {period!r}")
  return layer_types_from_hf(hf, layers, layer_pattern(layers, period))


def config_from_hf(hf: dict) -> ModelConfig:
  version = _version(hf)
  _refuse_unsupported(hf, version)
  d = {k: hf.get(k, v) for k, v in _DEFAULTS[version].items()}
  if version == 3:
    rope = _gemma3_rope(hf, d["max_position_embeddings"])
  else:
    rope = rope_from_hf(hf)
  if rope["partial_rotary_factor"] != 1.0:  # transformers' Gemma rotates every dim
    raise ConfigError(f"config.json: partial_rotary_factor={rope['partial_rotary_factor']} "
                      f"is not supported for {_MODEL_TYPES[version]}")
  bias = hf.get("attention_bias", False)  # q, k, v and o alike
  kw = {}
  if version > 1:
    types = _layer_types(hf, version, d["num_hidden_layers"])
    kw = dict(sandwich_norm=True, layer_types=types,
              sliding_window=hf.get("sliding_window", 4096) if "sliding_attention" in types
              else None,
              query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
              attn_logit_softcapping=hf.get("attn_logit_softcapping",
                                            50.0 if version == 2 else None),
              final_logit_softcapping=hf.get("final_logit_softcapping",
                                             30.0 if version == 2 else None),
              qk_norm="rmsnorm" if version == 3 else None)
  return ModelConfig(
      model_type=_MODEL_TYPES[version], **d,
      head_dim=hf.get("head_dim", 256), hidden_act=_activation(hf, version),
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=hf.get("attention_dropout", 0.0),
      type_vocab_size=0, layer_norm_eps=hf.get("rms_norm_eps", 1e-6),
      initializer_range=hf.get("initializer_range", 0.02),
      tie_word_embeddings=hf.get("tie_word_embeddings", True),
      causal=True, norm_type="rmsnorm", norm_position="pre", norm_scale_offset=1.0,
      scale_embeddings=True, mlp_type="gated", mlp_bias=False,
      attention_bias=bias, attention_out_bias=bias, position_embedding_type="rope",
      pad_token_id=hf.get("pad_token_id", 0), bos_token_id=hf.get("bos_token_id", 2),
      eos_token_id=hf.get("eos_token_id", 1), **rope, **kw)


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
  version = {_GEMMA: 1, _GEMMA2: 2, _GEMMA3: 3}[arch]
  name = arch.removesuffix("ForCausalLM")
  expect(cfg, name, causal=True, norm_type="rmsnorm", norm_position="pre",
         norm_scale_offset=1.0, scale_embeddings=True, embedding_norm=False,
         mlp_type="gated", mlp_bias=False, parallel_residual=False,
         position_embedding_type="rope", sandwich_norm=version > 1,
         qk_norm="rmsnorm" if version == 3 else None)
  if cfg.attention_out_bias not in (None, cfg.attention_bias):
    expect(cfg, name, attention_out_bias=cfg.attention_bias)
  out = {**llama.block_to_hf(cfg, arch, _MODEL_TYPES[version], _FEATURES[version]),
         "attention_bias": cfg.attention_bias}
  if version == 1:
    expect(cfg, name, sliding_window=None)
    if cfg.hidden_act == "gelu":  # GemmaConfig would read it as the tanh GELU
      raise ConfigError("model.hidden_act='gelu' (exact) cannot be saved as Gemma "
                        "(transformers reads a Gemma 'gelu' as the tanh approximation)")
    return out
  window = cfg.sliding_window
  del out["hidden_act"]  # Gemma2Config and Gemma3TextConfig read hidden_activation only
  out.update({"hidden_activation": cfg.hidden_act, "sliding_window": window,
              "layer_types": cfg.layer_types or [
                  "full_attention" if window is None else "sliding_attention"
              ] * cfg.num_hidden_layers,
              "query_pre_attn_scalar": cfg.query_pre_attn_scalar or cfg.head_size,
              "attn_logit_softcapping": cfg.attn_logit_softcapping,
              "final_logit_softcapping": cfg.final_logit_softcapping})
  if version == 3:  # RoPE per layer type; without a local base both rotate alike
    full = out["rope_parameters"]
    local = full if cfg.rope_local_base_freq is None else {
        "rope_type": "default", "rope_theta": cfg.rope_local_base_freq}
    out.update(rope_parameters={"full_attention": full, "sliding_attention": local},
               use_bidirectional_attention=False)
  return out


def tensor_map(cfg: ModelConfig) -> TensorMap:
  """Llama's names; its map names the four norms of sandwich_norm (Gemma 2, 3) and the q/k
  norms (Gemma 3)."""
  return llama.tensor_map(cfg, _GEMMA)


FAMILIES = (map_family("gemma", (_GEMMA, _GEMMA2, _GEMMA3), config_from_hf, config_to_hf,
                       tensor_map),)
