"""Phi-3 (Phi3ForCausalLM; Phi-3 / Phi-3.5 mini and medium, Phi-4-mini): Llama's block
(RMSNorm, SwiGLU MLP, RoPE, GQA, no biases) with
  - fused projections: `qkv_proj` stacks [q | k | v] rows and `gate_up_proj` [gate | up]
    rows; import splits them into jaxlm's q/k/v and gate/up Denses, export fuses them;
  - partial rotary (`partial_rotary_factor`): the first R dims of each head rotate in
    the halves layout, as GPT-NeoX;
  - `longrope` RoPE scaling (spelled "su" in early configs): per-frequency short/long
    factors, cos and sin times the attention factor (jaxlm.layers.position);
  - an optional sliding window over every layer.
head_dim is always hidden_size / heads. The embedding dropout `embd_pdrop` is not used by
transformers' Phi-3, and jaxlm applies `resid_pdrop` (hidden_dropout_prob) to the
embeddings too, so a non-zero embd_pdrop different from resid_pdrop is refused.

transformers' Phi-3 generate drops its KV cache and recomputes the whole sequence when it
grows past original_max_position_embeddings (the long factors then rotate every key), and
so does jaxlm.generate (generate/decode.py recompute_step); stream, speculative decoding
and the serving engine refuse to cross that length.
"""

from __future__ import annotations

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.hf import llama
from jaxlm.hf.common import TensorMap, expect, map_family, rope_from_hf

ARCH = "Phi3ForCausalLM"


def _is_longrope(cfg: ModelConfig) -> bool:
  return (cfg.rope_scaling or {}).get("rope_type") == "longrope"


def config_from_hf(hf: dict) -> ModelConfig:
  heads = hf.get("num_attention_heads", 32)
  d = hf.get("hidden_size", 3072)
  if hf.get("head_dim") not in (None, d // heads):  # transformers ignores it: refuse
    raise ConfigError(f"config.json: head_dim={hf['head_dim']!r} is not supported for phi3 "
                      f"(always hidden_size / num_attention_heads = {d // heads})")
  resid, embd = hf.get("resid_pdrop", 0.0), hf.get("embd_pdrop", 0.0)
  if embd not in (0, 0.0, resid):
    raise ConfigError(f"config.json: embd_pdrop={embd!r} is not supported for phi3 (jaxlm "
                      f"drops embeddings at resid_pdrop={resid!r}; set them equal or 0)")
  return ModelConfig(
      model_type="phi3", vocab_size=hf.get("vocab_size", 32064), hidden_size=d,
      num_hidden_layers=hf.get("num_hidden_layers", 32), num_attention_heads=heads,
      num_key_value_heads=hf.get("num_key_value_heads") or heads, head_dim=d // heads,
      intermediate_size=hf.get("intermediate_size", 8192),
      hidden_act=hf.get("hidden_act", "silu"), hidden_dropout_prob=resid,
      attention_probs_dropout_prob=hf.get("attention_dropout", 0.0),
      max_position_embeddings=hf.get("max_position_embeddings", 4096),
      type_vocab_size=0, layer_norm_eps=hf.get("rms_norm_eps", 1e-5),
      initializer_range=hf.get("initializer_range", 0.02),
      tie_word_embeddings=hf.get("tie_word_embeddings", False),
      causal=True, norm_type="rmsnorm", norm_position="pre", mlp_type="gated",
      mlp_bias=False, attention_bias=False, attention_out_bias=False,
      sliding_window=hf.get("sliding_window"), position_embedding_type="rope",
      pad_token_id=hf.get("pad_token_id", 32000), bos_token_id=hf.get("bos_token_id", 1),
      eos_token_id=hf.get("eos_token_id", 32000), **rope_from_hf(hf, longrope=True))


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
  expect(cfg, "Phi3", causal=True, norm_type="rmsnorm", norm_position="pre",
         embedding_norm=False, mlp_type="gated", mlp_bias=False, attention_bias=False,
         parallel_residual=False, position_embedding_type="rope")
  if cfg.attention_out_bias not in (None, False):
    expect(cfg, "Phi3", attention_out_bias=False)
  if cfg.head_size * cfg.num_attention_heads != cfg.hidden_size:
    raise ConfigError(f"model.head_dim={cfg.head_size} cannot be saved as Phi3 (it fixes "
                      "head_dim to hidden_size / num_attention_heads)")
  out = {**llama.block_to_hf(cfg, arch, "phi3", with_partial=True, longrope=True),
         "sliding_window": cfg.sliding_window,
         "resid_pdrop": cfg.hidden_dropout_prob, "embd_pdrop": cfg.hidden_dropout_prob}
  del out["head_dim"]  # Phi3Config has none
  if _is_longrope(cfg):  # transformers keeps it at the top level as well
    out["original_max_position_embeddings"] = cfg.rope_scaling[
        "original_max_position_embeddings"]
  return out


def tensor_map(cfg: ModelConfig) -> TensorMap:
  tm = TensorMap("model.", ignore=[r"\.rotary_emb\.(original_)?inv_freq$"])
  tm.rename("model.embed_tokens.weight", "model.embed.embedding")
  H, F = cfg.head_size, cfg.intermediate_size
  qkv = (cfg.num_attention_heads * H, cfg.kv_heads * H, cfg.kv_heads * H)
  for i in range(cfg.num_hidden_layers):
    h, j = f"model.layers.{i}", f"model.layers.{i}"
    tm.norm(f"{h}.input_layernorm", f"{j}.attn_norm", bias=False)
    tm.stacked_linear(f"{h}.self_attn.qkv_proj", [f"{j}.attn.{n}" for n in "qkv"], qkv)
    tm.linear(f"{h}.self_attn.o_proj", f"{j}.attn.o", bias=False)
    tm.norm(f"{h}.post_attention_layernorm", f"{j}.mlp_norm", bias=False)
    tm.stacked_linear(f"{h}.mlp.gate_up_proj", [f"{j}.mlp.gate", f"{j}.mlp.up"], (F, F))
    tm.linear(f"{h}.mlp.down_proj", f"{j}.mlp.down", bias=False)
  tm.norm("model.norm", "model.norm", bias=False)
  return tm.lm_head("lm_head", tied=cfg.tie_word_embeddings)


FAMILIES = (map_family("phi3", (ARCH,), config_from_hf, config_to_hf, tensor_map),)
