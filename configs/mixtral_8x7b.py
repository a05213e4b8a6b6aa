"""Mixtral 8x7B shape (32 layers, 4096 wide, 32 heads with 8 KV heads, 8 SwiGLU experts of
14336 with top-2 routing, RMSNorm, RoPE theta 1e6, untied LM head) as a causal LM.

  python -m jaxlm.main --config=configs/mixtral_8x7b.py --workdir=runs/mixtral_8x7b

The full size (47B parameters, 13B active per token) is meant for sharded accelerator
runs; it validates and builds abstractly here. `configs/mixtral_8x7b.py:tiny` (the same as
`configs/mixtral_tiny.py`) keeps the architecture at toy size and trains in seconds on a
CPU. The router's load-balancing loss is weighted by `model.router_aux_loss_coef` (0.02,
as Mixtral's published config), and `model.router_z_loss_coef` adds the ST-MoE z-loss.
"""

from jaxlm import experiment


def get_config(arg=None):
  c = experiment.base_config()
  c.model.update(
      model_type="mixtral", architectures=["MixtralForCausalLM"], causal=True,
      hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
      intermediate_size=14336, hidden_act="silu", mlp_type="gated", mlp_bias=False,
      attention_bias=False, norm_type="rmsnorm", norm_position="pre", layer_norm_eps=1e-5,
      position_embedding_type="rope", rope_theta=1e6, max_position_embeddings=32768,
      num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02,
      type_vocab_size=0, tie_word_embeddings=False, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, dtype="bfloat16")
  experiment.causal_lm_run(c, max_seq_len=4096, batch_size=8, learning_rate=3e-4)
  if arg == "tiny":
    # 4 experts, so each one's share of the routed tokens is easy to see (ideal 1/4).
    c.model.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=64, num_local_experts=4,
                   max_position_embeddings=128, dtype="float32")
    experiment.tiny_run(c)
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use configs/mixtral_8x7b.py or :tiny")
  return c
