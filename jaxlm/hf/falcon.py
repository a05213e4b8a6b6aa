"""Falcon (FalconForCausalLM): LayerNorm with bias, a plain GELU MLP (ffn_hidden_size),
`bias` on every Linear or none, RoPE (Llama's halves) or ALiBi, a tied head by default,
and three block layouts transformers' FalconDecoderLayer builds:
  - parallel_attn with one input_layernorm feeding attention and MLP (Falcon-7B; the
    new decoder architecture with num_ln_in_parallel_attn=1 too): parallel_shared_norm;
  - new_decoder_architecture with ln_attn and ln_mlp (Falcon-40B/180B): two norms;
  - parallel_attn=False: sequential pre-LN with post_attention_layernorm (Falcon-RW).
One fused query_key_value holds q, k and v per KV group, [K, G + 2, H] rows
(common.qkv_split_grouped): the old multi-head layout is its G = 1 case, multi_query
its K = 1 case, so one rule serves all three. Falcon's ALiBi is BLOOM's computed in
bfloat16 and scaled by 1/sqrt(head_dim) (ModelConfig.alibi_style="falcon").

Export writes new_decoder_architecture only where the old one cannot express the model
(two norms, or 1 < K < N KV heads): for K = 1 and K = N both architectures compute the
same function from the same tensors, so a new-architecture checkpoint with those may come
back as the old one.
"""

from __future__ import annotations

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.hf.common import (TensorMap, common_to_hf, expect, map_family, qkv_fuse_grouped,
                             qkv_split_grouped, rope_from_hf, rope_to_hf,
                             special_tokens_from_hf)
from jaxlm.layers.activations import ACTIVATIONS

_ARCH = "FalconForCausalLM"
_FEATURES = ("parallel_shared_norm", "alibi_style")  # common.OPTIONAL_FIELDS Falcon uses


def _refuse_unsupported(hf: dict, new: bool, parallel: bool) -> None:
  """Layouts transformers' Falcon cannot run (it fails or mis-shapes there) and old keys
  it no longer reads: a one-line error naming the key, never a guess."""
  for key in ("n_head", "n_layer", "n_head_kv"):
    if key in hf:
      raise ConfigError(f"config.json: {key} is an old Falcon (RefinedWeb) key that "
                        "transformers 5 no longer reads; rename it (num_attention_heads, "
                        "num_hidden_layers, num_kv_heads)")
  n_ln = hf.get("num_ln_in_parallel_attn")
  if new and not parallel:
    raise ConfigError("config.json: new_decoder_architecture=True needs parallel_attn=True "
                      "(transformers' FalconDecoderLayer fails without it)")
  if new and n_ln not in (None, 1, 2):
    raise ConfigError(f"config.json: num_ln_in_parallel_attn={n_ln!r} is not supported "
                      "(1 or 2)")
  if not new and parallel and n_ln not in (None, 1):
    raise ConfigError(f"config.json: num_ln_in_parallel_attn={n_ln!r} needs "
                      "new_decoder_architecture=True (the old one has one norm)")
  act = hf.get("activation", "gelu")
  if act not in ACTIVATIONS:
    raise ConfigError(f"config.json: activation={act!r} is not supported "
                      f"(supported: {sorted(ACTIVATIONS)})")


def _kv_heads(hf: dict, heads: int, new: bool) -> int:
  kv = hf.get("num_kv_heads") or heads
  if new:
    return kv
  if hf.get("multi_query", True):
    return 1  # multi_query: num_kv_heads is not read
  if kv != heads:
    raise ConfigError(f"config.json: num_kv_heads={kv} needs new_decoder_architecture=True "
                      f"or multi_query=True (the old multi-head layout has {heads})")
  return heads


def config_from_hf(hf: dict) -> ModelConfig:
  new = bool(hf.get("new_decoder_architecture", False))
  parallel = bool(hf.get("parallel_attn", True))
  _refuse_unsupported(hf, new, parallel)
  d = hf.get("n_embed") or hf.get("hidden_size", 4544)  # FalconConfig reads n_embed too
  heads = hf.get("num_attention_heads", 71)
  alibi = bool(hf.get("alibi", False))
  rope = rope_from_hf(hf)
  if rope["partial_rotary_factor"] != 1.0:  # transformers' Falcon rotates every dim
    raise ConfigError(f"config.json: partial_rotary_factor={rope['partial_rotary_factor']} "
                      "is not supported for falcon")
  bias = bool(hf.get("bias", False))
  # num_ln_in_parallel_attn: None means 2 in the new architecture, 1 in the old
  two_norms = new and hf.get("num_ln_in_parallel_attn") in (None, 2)
  return ModelConfig(
      model_type="falcon", vocab_size=hf.get("vocab_size", 65024), hidden_size=d,
      num_hidden_layers=hf.get("num_hidden_layers", 32), num_attention_heads=heads,
      num_key_value_heads=_kv_heads(hf, heads, new),
      intermediate_size=hf.get("ffn_hidden_size") or 4 * d,
      hidden_act=hf.get("activation", "gelu"),
      hidden_dropout_prob=hf.get("hidden_dropout", 0.0),
      attention_probs_dropout_prob=hf.get("attention_dropout", 0.0),
      max_position_embeddings=hf.get("max_position_embeddings", 2048), type_vocab_size=0,
      layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
      initializer_range=hf.get("initializer_range", 0.02),
      tie_word_embeddings=hf.get("tie_word_embeddings", True),
      causal=True, norm_position="pre", mlp_bias=bias, attention_bias=bias,
      attention_out_bias=bias, parallel_residual=parallel,
      parallel_shared_norm=parallel and not two_norms,
      position_embedding_type="alibi" if alibi else "rope",
      alibi_style="falcon" if alibi else "bloom",
      **rope, **{**special_tokens_from_hf(hf), "bos_token_id": hf.get("bos_token_id", 11),
                 "eos_token_id": hf.get("eos_token_id", 11)})


def _new_architecture(cfg: ModelConfig) -> bool:
  """Whether only new_decoder_architecture expresses the model (see the module doc)."""
  grouped = 1 < cfg.kv_heads < cfg.num_attention_heads
  return cfg.parallel_residual and (grouped or not cfg.parallel_shared_norm)


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
  alibi = cfg.position_embedding_type == "alibi"
  expect(cfg, "Falcon", causal=True, norm_type="layernorm", norm_position="pre",
         norm_bias=True, embedding_norm=False, mlp_type="plain", sliding_window=None,
         mlp_bias=cfg.attention_bias, rope_interleaved=False,
         head_dim=None if cfg.head_dim is None else cfg.hidden_size // cfg.num_attention_heads)
  if cfg.attention_out_bias not in (None, cfg.attention_bias):
    expect(cfg, "Falcon", attention_out_bias=cfg.attention_bias)
  if cfg.position_embedding_type not in ("rope", "alibi"):
    expect(cfg, "Falcon", position_embedding_type="rope")
  expect(cfg, "Falcon", alibi_style="falcon" if alibi else cfg.alibi_style)
  new = _new_architecture(cfg)
  K, N = cfg.kv_heads, cfg.num_attention_heads
  if not new and 1 < K < N:
    raise ConfigError(f"model.num_key_value_heads={K} cannot be saved as Falcon with a "
                      "sequential block (grouped KV heads need the parallel "
                      "new_decoder_architecture)")
  return {
      **common_to_hf(cfg, arch, "falcon", features=_FEATURES),
      "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
      "num_attention_heads": N,
      "num_kv_heads": K if new or K > 1 else N,  # multi_query: transformers writes N
      # multi_query: not read by the new architecture (written at FalconConfig's default)
      "new_decoder_architecture": new, "multi_query": new or K == 1,
      "parallel_attn": cfg.parallel_residual,
      "num_ln_in_parallel_attn": (1 if cfg.parallel_shared_norm else 2) if new else None,
      "bias": cfg.attention_bias, "alibi": alibi, "activation": cfg.hidden_act,
      "ffn_hidden_size": cfg.intermediate_size,
      "max_position_embeddings": cfg.max_position_embeddings,
      "layer_norm_epsilon": cfg.layer_norm_eps, "hidden_dropout": cfg.hidden_dropout_prob,
      "attention_dropout": cfg.attention_probs_dropout_prob,
      "rope_parameters": rope_to_hf(cfg, with_partial=False),
  }


def _norms(cfg: ModelConfig) -> tuple[tuple[str, str], ...]:
  """HF names of a block's norms -> jaxlm's, per layout."""
  if not cfg.parallel_residual:
    return ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")
  if cfg.parallel_shared_norm:
    return (("input_layernorm", "attn_norm"),)
  return ("ln_attn", "attn_norm"), ("ln_mlp", "mlp_norm")


def tensor_map(cfg: ModelConfig) -> TensorMap:
  K, H = cfg.kv_heads, cfg.head_size
  G = cfg.num_attention_heads // K
  bias = cfg.attention_bias
  # rotary inv_freq: a buffer older checkpoints saved; recomputed from the config.
  tm = TensorMap("transformer.", ignore=[r"\.inv_freq$"])
  tm.rename("transformer.word_embeddings.weight", "model.embed.embedding")
  for i in range(cfg.num_hidden_layers):
    h, j = f"transformer.h.{i}", f"model.layers.{i}"
    for hf_name, jax_name in _norms(cfg):
      tm.norm(f"{h}.{hf_name}", f"{j}.{jax_name}", bias=True)
    tm.fused_linear(f"{h}.self_attention.query_key_value", [f"{j}.attn.{n}" for n in "qkv"],
                    lambda w: qkv_split_grouped(w, K, G, H),
                    lambda ps: qkv_fuse_grouped(ps, K, G, H), bias=bias)
    tm.linear(f"{h}.self_attention.dense", f"{j}.attn.o", bias=bias)
    tm.linear(f"{h}.mlp.dense_h_to_4h", f"{j}.mlp.up", bias=bias)
    tm.linear(f"{h}.mlp.dense_4h_to_h", f"{j}.mlp.down", bias=bias)
  tm.norm("transformer.ln_f", "model.norm", bias=True)
  return tm.lm_head("lm_head", tied=cfg.tie_word_embeddings)


FAMILIES = (map_family("falcon", (_ARCH,), config_from_hf, config_to_hf, tensor_map),)
