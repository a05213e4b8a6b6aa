"""DBRX (DbrxForCausalLM): a pre-LN decoder with bias-free LayerNorms (eps 1e-5), RoPE,
GQA and a sparse MoE of SwiGLU experts in every block, configured by nested dicts:
  - attn_config: kv_n_heads, attn_pdrop and `clip_qkv`, which clamps the fused Wqkv
    output to [-clip, clip] before q, k and v are split (ModelConfig.clip_qkv);
  - ffn_config: moe_num_experts (16 in the released model), moe_top_k (4),
    ffn_hidden_size, moe_loss_weight (the load-balancing loss weight, as Mixtral's
    router_aux_loss_coef) and moe_normalize_expert_weights, the p of the norm the top-k
    routing weights are divided by (ModelConfig.router_norm_p; null: not renormalized).
Tensors: the fused [q | k | v] `Wqkv` splits into q/k/v; the experts are three fused
[E*F, D] tensors: `w1` (gate) and `v1` (up), each expert's rows [F, D] applied as
x @ w.T, and `w2` (down), each expert's [F, D] applied as h @ w2. The head is never tied
(DbrxConfig refuses it).

transformers 5 reads the RoPE base from rope_parameters (default 10000), not from the
attn_config.rope_theta of older configs (which it still requires, unused): a config whose
attn_config.rope_theta disagrees with it is refused rather than read one way or the other.
Export writes both.
"""

from __future__ import annotations

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.hf.common import (TensorMap, common_to_hf, expect, map_family, rope_from_hf, rope_to_hf,
                             special_tokens_from_hf)
from jaxlm.layers.activations import ACTIVATIONS

ARCH = "DbrxForCausalLM"
_EPS = 1e-5  # torch.nn.LayerNorm's default: DBRX has no config key for it


def _activation(ffn: dict) -> str:
  act = ffn.get("ffn_act_fn") or {"name": "silu"}
  if not isinstance(act, dict) or set(act) - {"name"} or act.get("name", "silu") not in ACTIVATIONS:
    raise ConfigError(f"config.json: ffn_config.ffn_act_fn={act!r} is not supported (a dict "
                      f"with only a 'name' among {sorted(ACTIVATIONS)})")
  return act.get("name", "silu")


def config_from_hf(hf: dict) -> ModelConfig:
  attn, ffn = hf.get("attn_config") or {}, hf.get("ffn_config") or {}
  d = hf.get("d_model", 2048)
  if hf.get("tie_word_embeddings"):
    raise ConfigError("config.json: tie_word_embeddings=True is not supported for dbrx "
                      "(transformers' DbrxConfig refuses it too)")
  if ffn.get("hidden_size", 6144) != d:  # the experts' and router's width in transformers
    raise ConfigError(f"config.json: ffn_config.hidden_size={ffn.get('hidden_size', 6144)!r} "
                      f"must equal d_model={d}")
  if ffn.get("moe_jitter_eps"):
    raise ConfigError(f"config.json: ffn_config.moe_jitter_eps={ffn['moe_jitter_eps']!r} is "
                      "not supported (router jitter in training is not implemented; set null)")
  p = ffn.get("moe_normalize_expert_weights", 1.0)
  if p is not None and not (isinstance(p, (int, float)) and p > 0):
    raise ConfigError(f"config.json: ffn_config.moe_normalize_expert_weights={p!r} is not "
                      "supported (a positive p, or null for no renormalization)")
  resid, emb = hf.get("resid_pdrop", 0.0), hf.get("emb_pdrop", 0.0)
  if emb not in (0, 0.0, resid):
    raise ConfigError(f"config.json: emb_pdrop={emb!r} is not supported for dbrx (jaxlm "
                      f"drops embeddings at resid_pdrop={resid!r}; set them equal or 0)")
  rope = rope_from_hf(hf)
  old_theta = attn.get("rope_theta")
  if old_theta is not None and float(old_theta) != rope["rope_theta"]:
    raise ConfigError(f"config.json: attn_config.rope_theta={old_theta!r} disagrees with "
                      f"rope_parameters' rope_theta={rope['rope_theta']!r}, which transformers "
                      "5 uses; give rope_parameters the base the model was trained with")
  if rope["partial_rotary_factor"] != 1.0:
    raise ConfigError(f"config.json: partial_rotary_factor={rope['partial_rotary_factor']} "
                      "is not supported for dbrx (transformers' DBRX rotates every dim)")
  heads = hf.get("n_heads", 16)
  return ModelConfig(
      model_type="dbrx", vocab_size=hf.get("vocab_size", 32000), hidden_size=d,
      num_hidden_layers=hf.get("n_layers", 24), num_attention_heads=heads,
      num_key_value_heads=attn.get("kv_n_heads", 1), head_dim=d // heads,
      intermediate_size=ffn.get("ffn_hidden_size", 3584), hidden_act=_activation(ffn),
      hidden_dropout_prob=resid, attention_probs_dropout_prob=attn.get("attn_pdrop", 0.0),
      max_position_embeddings=hf.get("max_seq_len", 2048), type_vocab_size=0,
      layer_norm_eps=_EPS, initializer_range=hf.get("initializer_range", 0.02),
      tie_word_embeddings=False, causal=True, norm_type="layernorm", norm_position="pre",
      norm_bias=False, mlp_type="gated", mlp_bias=False, attention_bias=False,
      attention_out_bias=False, clip_qkv=attn.get("clip_qkv"),
      position_embedding_type="rope", num_local_experts=ffn.get("moe_num_experts", 4),
      num_experts_per_tok=ffn.get("moe_top_k", 1),
      router_aux_loss_coef=ffn.get("moe_loss_weight", 0.01),
      router_norm_p=None if p is None else float(p),
      **rope, **special_tokens_from_hf(hf))


def config_to_hf(cfg: ModelConfig, arch: str) -> dict:
  expect(cfg, "Dbrx", causal=True, norm_type="layernorm", norm_position="pre", norm_bias=False,
         embedding_norm=False, mlp_type="gated", mlp_bias=False, attention_bias=False,
         parallel_residual=False, position_embedding_type="rope", layer_norm_eps=_EPS,
         sliding_window=None, tie_word_embeddings=False,
         moe_capacity_factor=None)  # transformers' DBRX never drops a token
  if cfg.attention_out_bias not in (None, False):
    expect(cfg, "Dbrx", attention_out_bias=False)
  if cfg.num_local_experts < 1:
    raise ConfigError("model.num_local_experts=0 cannot be saved as Dbrx (its FFN is a "
                      "mixture of experts)")
  if cfg.head_size * cfg.num_attention_heads != cfg.hidden_size:
    raise ConfigError(f"model.head_dim={cfg.head_size} cannot be saved as Dbrx (it fixes "
                      "head_dim to d_model / n_heads)")
  return {
      **common_to_hf(cfg, arch, "dbrx", moe=True, features=("clip_qkv",)),
      "d_model": cfg.hidden_size, "n_heads": cfg.num_attention_heads,
      "n_layers": cfg.num_hidden_layers, "max_seq_len": cfg.max_position_embeddings,
      "resid_pdrop": cfg.hidden_dropout_prob, "emb_pdrop": cfg.hidden_dropout_prob,
      "rope_parameters": rope_to_hf(cfg, with_partial=False),
      # transformers 5.25's DbrxAttention fails without attn_config.rope_theta (unused)
      "attn_config": {"attn_pdrop": cfg.attention_probs_dropout_prob,
                      "clip_qkv": cfg.clip_qkv, "kv_n_heads": cfg.kv_heads,
                      "rope_theta": cfg.rope_theta},
      "ffn_config": {"ffn_act_fn": {"name": cfg.hidden_act},
                     "ffn_hidden_size": cfg.intermediate_size, "hidden_size": cfg.hidden_size,
                     "moe_jitter_eps": None, "moe_loss_weight": cfg.router_aux_loss_coef,
                     "moe_normalize_expert_weights": cfg.router_norm_p,
                     "moe_num_experts": cfg.num_local_experts,
                     "moe_top_k": cfg.num_experts_per_tok},
      "output_router_logits": False,
  }


# ---- expert layouts: [E*F, D] in the checkpoint -------------------------------------------
def _experts(E: int, F: int, D: int):
  """(split, fuse) of w1/v1 <-> kernels [E, D, F], and of w2 <-> kernels [E, F, D]."""
  def split_in(w):  # rows of expert e: x @ w[e].T
    return [w.reshape(E, F, D).transpose(0, 2, 1)]

  def fuse_in(parts):
    return parts[0].transpose(0, 2, 1).reshape(E * F, D)

  def split_out(w):  # expert e: h @ w[e]
    return [w.reshape(E, F, D)]

  def fuse_out(parts):
    return parts[0].reshape(E * F, D)

  return (split_in, fuse_in), (split_out, fuse_out)


def tensor_map(cfg: ModelConfig) -> TensorMap:
  tm = TensorMap("transformer.", ignore=[r"\.rotary_emb\.(original_)?inv_freq$"])
  tm.rename("transformer.wte.weight", "model.embed.embedding")
  H, D = cfg.head_size, cfg.hidden_size
  qkv = (cfg.num_attention_heads * H, cfg.kv_heads * H, cfg.kv_heads * H)
  gate_up, down = _experts(cfg.num_local_experts, cfg.intermediate_size, D)
  for i in range(cfg.num_hidden_layers):
    h, j = f"transformer.blocks.{i}", f"model.layers.{i}"
    tm.norm(f"{h}.norm_attn_norm.norm_1", f"{j}.attn_norm", bias=False)
    tm.stacked_linear(f"{h}.norm_attn_norm.attn.Wqkv", [f"{j}.attn.{n}" for n in "qkv"],
                      qkv)
    tm.linear(f"{h}.norm_attn_norm.attn.out_proj", f"{j}.attn.o", bias=False)
    tm.norm(f"{h}.norm_attn_norm.norm_2", f"{j}.mlp_norm", bias=False)
    tm.linear(f"{h}.ffn.router.layer", f"{j}.mlp.router", bias=False)
    experts = f"{h}.ffn.experts.mlp"
    tm.fused(f"{experts}.w1", [f"{j}.mlp.gate"], *gate_up)
    tm.fused(f"{experts}.v1", [f"{j}.mlp.up"], *gate_up)
    tm.fused(f"{experts}.w2", [f"{j}.mlp.down"], *down)
  tm.norm("transformer.norm_f", "model.norm", bias=False)
  return tm.lm_head("lm_head", tied=False)


FAMILIES = (map_family("dbrx", (ARCH,), config_from_hf, config_to_hf, tensor_map),)
