"""Mixtral (MixtralForCausalLM): the Mistral block (RMSNorm, RoPE, GQA, optional sliding
window, no biases) with a sparse MoE of SwiGLU experts in place of the MLP.

Expert tensors come in two layouts, and import accepts both:
  - per expert, as Hub checkpoints and transformers' own `save_pretrained` write them:
    `layers.i.block_sparse_moe.experts.j.{w1,w3,w2}.weight` (gate, up: [F, D]; down: [D, F])
    and the router `layers.i.block_sparse_moe.gate.weight` [E, D];
  - fused, as transformers 5 holds them in memory: `layers.i.mlp.experts.gate_up_proj`
    [E, 2F, D] (gate rows, then up rows), `layers.i.mlp.experts.down_proj` [E, D, F] and
    `layers.i.mlp.gate.weight`.
Export writes the per-expert layout, which is what transformers 5.24 writes and reads.
"""

from __future__ import annotations

import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.hf.common import (TensorMap, common_to_hf, expect, require,
                             rope_from_hf, rope_to_hf, special_tokens_from_hf)
from jaxlm.hf.family import Family, Tensors

ARCH = "MixtralForCausalLM"


def config_from_hf(hf: dict) -> ModelConfig:
  require(hf, "router_jitter_noise", lambda v: not v, 0.0,
          "router jitter noise is not implemented; set it to 0")
  heads = hf.get("num_attention_heads", 32)
  d = hf.get("hidden_size", 4096)
  return ModelConfig(
      model_type="mixtral", vocab_size=hf.get("vocab_size", 32000), hidden_size=d,
      num_hidden_layers=hf.get("num_hidden_layers", 32), num_attention_heads=heads,
      num_key_value_heads=hf.get("num_key_value_heads", 8) or heads,
      head_dim=hf.get("head_dim") or d // heads,
      intermediate_size=hf.get("intermediate_size", 14336),
      hidden_act=hf.get("hidden_act", "silu"), hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=hf.get("attention_dropout", 0.0),
      max_position_embeddings=hf.get("max_position_embeddings", 4096 * 32),
      type_vocab_size=0, layer_norm_eps=hf.get("rms_norm_eps", 1e-5),
      initializer_range=hf.get("initializer_range", 0.02),
      tie_word_embeddings=hf.get("tie_word_embeddings", False),
      causal=True, norm_type="rmsnorm", norm_position="pre", mlp_type="gated",
      mlp_bias=False, attention_bias=False, attention_out_bias=False,
      sliding_window=hf.get("sliding_window"), position_embedding_type="rope",
      num_local_experts=hf.get("num_local_experts", 8),
      num_experts_per_tok=hf.get("num_experts_per_tok", 2),
      router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
      **rope_from_hf(hf, default_theta=1e6), **special_tokens_from_hf(hf))


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
  expect(cfg, "Mixtral", causal=True, norm_type="rmsnorm", norm_position="pre",
         embedding_norm=False, mlp_type="gated", mlp_bias=False, attention_bias=False,
         parallel_residual=False, position_embedding_type="rope",
         moe_capacity_factor=None,  # transformers' Mixtral never drops a token
         router_norm_p=1.0)  # and renormalizes the top-k weights by their sum
  if cfg.attention_out_bias not in (None, False):
    expect(cfg, "Mixtral", attention_out_bias=False)
  if cfg.num_local_experts < 1:
    raise ConfigError("model.num_local_experts=0 cannot be saved as Mixtral (a dense model; "
                      "use MistralForCausalLM)")
  return {
      **common_to_hf(cfg, arch, "mixtral", moe=True),
      "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
      "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.kv_heads,
      # null = hidden_size // heads, as transformers writes it
      "head_dim": (None if cfg.head_size * cfg.num_attention_heads == cfg.hidden_size
                   else cfg.head_size),
      "intermediate_size": cfg.intermediate_size,
      "hidden_act": cfg.hidden_act, "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.layer_norm_eps, "attention_dropout": cfg.attention_probs_dropout_prob,
      "sliding_window": cfg.sliding_window,
      "rope_parameters": rope_to_hf(cfg, with_partial=False),
      "num_local_experts": cfg.num_local_experts,
      "num_experts_per_tok": cfg.num_experts_per_tok,
      "router_aux_loss_coef": cfg.router_aux_loss_coef,
      "router_jitter_noise": 0.0, "output_router_logits": False,
  }


# ---- expert layouts ----------------------------------------------------------------------
def _stack_linears(ws):
  """Per-expert torch Linear weights [out, in] -> stacked kernels [E, in, out]."""
  return np.stack([w.T for w in ws])


def _unstack_linears(k_EIO):
  return [np.ascontiguousarray(k.T) for k in k_EIO]


def _split_gate_up(w_E2FD):
  if w_E2FD.ndim != 3 or w_E2FD.shape[1] % 2:
    raise ValueError("not [E, 2F, D]")
  F = w_E2FD.shape[1] // 2
  return [w_E2FD[:, :F].transpose(0, 2, 1), w_E2FD[:, F:].transpose(0, 2, 1)]


def _fuse_gate_up(parts):
  return np.concatenate([p.transpose(0, 2, 1) for p in parts], axis=1)


def _swap_last(w):
  if w.ndim != 3:
    raise ValueError("not 3-D")
  return [w.transpose(0, 2, 1)]


def tensor_map(cfg: ModelConfig, *, moe: str = "block_sparse_moe", fused: bool = False
               ) -> TensorMap:
  """`moe`: the MoE module's name ("block_sparse_moe" on the Hub, "mlp" in transformers 5);
  `fused`: gate_up_proj/down_proj tensors instead of per-expert w1/w3/w2."""
  tm = TensorMap("model.", ignore=[r"\.rotary_emb\.inv_freq$"])
  tm.rename("model.embed_tokens.weight", "model.embed.embedding")
  E = cfg.num_local_experts
  for i in range(cfg.num_hidden_layers):
    h, j = f"model.layers.{i}", f"model.layers.{i}"
    tm.norm(f"{h}.input_layernorm", f"{j}.attn_norm", bias=False)
    for hf_name, jax_name in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"),
                              ("o_proj", "o")):
      tm.linear(f"{h}.self_attn.{hf_name}", f"{j}.attn.{jax_name}", bias=False)
    tm.norm(f"{h}.post_attention_layernorm", f"{j}.mlp_norm", bias=False)
    m = f"{h}.{moe}"
    tm.linear(f"{m}.gate", f"{j}.mlp.router", bias=False)
    if fused:
      tm.fused(f"{m}.experts.gate_up_proj", (f"{j}.mlp.gate", f"{j}.mlp.up"),
               _split_gate_up, _fuse_gate_up)
      tm.fused(f"{m}.experts.down_proj", (f"{j}.mlp.down",), _swap_last,
               lambda parts: parts[0].transpose(0, 2, 1))
    else:
      for w, jax_name in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
        tm.stacked([f"{m}.experts.{e}.{w}.weight" for e in range(E)], f"{j}.mlp.{jax_name}",
                   _stack_linears, _unstack_linears)
  tm.norm("model.norm", "model.norm", bias=False)
  return tm.lm_head("lm_head", tied=cfg.tie_word_embeddings)


def _layout_of(tensors: Tensors) -> dict:
  """Which expert layout a checkpoint uses (the first layer decides; mixed files then fail
  with a missing-tensor error naming what was expected)."""
  names = list(tensors)
  moe = "block_sparse_moe" if any(".block_sparse_moe." in k for k in names) else "mlp"
  fused = any(k.endswith(f"{moe}.experts.gate_up_proj") for k in names)
  return dict(moe=moe, fused=fused)


def params_from_hf(tensors: Tensors, cfg: ModelConfig, arch: str, expected) -> Tensors:
  return tensor_map(cfg, **_layout_of(tensors)).from_hf(tensors, expected, arch)


def params_to_hf(params: Tensors, cfg: ModelConfig, arch: str) -> Tensors:
  return tensor_map(cfg).to_hf(params)


FAMILIES = (Family("mixtral", (ARCH,), config_from_hf, config_to_hf, params_from_hf,
                   params_to_hf),)
