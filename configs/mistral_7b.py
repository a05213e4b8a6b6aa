"""Mistral 7B shape (32 layers, 4096 wide, 32 heads with 8 KV heads, SwiGLU 14336,
RMSNorm, RoPE theta 10000, a 4096-token sliding window, untied LM head) as a causal LM.

  python -m jaxlm.main --config=configs/mistral_7b.py --workdir=runs/mistral_7b

The full size is meant for sharded accelerator runs (it validates and builds abstractly
here); `configs/mistral_7b.py:tiny` keeps the architecture, with a sliding window shorter
than the rows so that it matters, and trains in seconds on a CPU.
"""

from jaxlm import experiment


def get_config(arg=None):
  c = experiment.base_config()
  c.model.update(
      model_type="mistral", architectures=["MistralForCausalLM"], causal=True,
      hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
      intermediate_size=14336, hidden_act="silu", mlp_type="gated", mlp_bias=False,
      attention_bias=False, norm_type="rmsnorm", norm_position="pre", layer_norm_eps=1e-5,
      position_embedding_type="rope", rope_theta=10000.0, sliding_window=4096,
      max_position_embeddings=32768, type_vocab_size=0, tie_word_embeddings=False,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, dtype="bfloat16")
  experiment.causal_lm_run(c, max_seq_len=4096, batch_size=8, learning_rate=3e-4)
  if arg == "tiny":
    c.model.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=128, sliding_window=16,
                   max_position_embeddings=128, dtype="float32")
    experiment.tiny_run(c)
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use configs/mistral_7b.py or :tiny")
  return c
