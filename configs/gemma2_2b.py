"""Gemma 2 2B shape (26 layers, 2304 wide, 8 query heads over 4 KV heads of 256 dims, GeGLU
9216 with tanh GELU, four (1 + w) RMSNorms per block, embeddings times sqrt(2304), logits
scaled by 1/sqrt(query_pre_attn_scalar=256) and soft-capped at 50, final logits at 30,
4096-token sliding windows on every other layer from layer 0, RoPE theta 10000, tied LM
head) as a causal LM on the embedded corpus.

  python -m jaxlm.main --config=configs/gemma2_2b.py --workdir=runs/gemma2_2b

The vocabulary is trained on the corpus (Gemma's own is 256000); everything else is the
published shape (google/gemma-2-2b). The full size validates and builds abstractly here
(`python -m jaxlm.report --config=configs/gemma2_2b.py` sizes it); its 8192-token rows are
twice the window, so the alternating layers differ. `configs/gemma2_2b.py:tiny` keeps the
architecture, with a 16-token window on its sliding layers (rows are 64), and trains in
seconds on a CPU.
"""

from jaxlm import experiment

ALTERNATING = ("sliding_attention", "full_attention")


def get_config(arg=None):
  c = experiment.base_config()
  c.model.update(
      model_type="gemma2", architectures=["Gemma2ForCausalLM"], causal=True,
      hidden_size=2304, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
      head_dim=256, intermediate_size=9216, hidden_act="gelu_pytorch_tanh", mlp_type="gated",
      mlp_bias=False, attention_bias=False, norm_type="rmsnorm", norm_position="pre",
      sandwich_norm=True, norm_scale_offset=1.0, scale_embeddings=True, layer_norm_eps=1e-6,
      sliding_window=4096, layer_types=[ALTERNATING[i % 2] for i in range(26)],
      query_pre_attn_scalar=256.0, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
      position_embedding_type="rope", rope_theta=10000.0, max_position_embeddings=8192,
      type_vocab_size=0, tie_word_embeddings=True, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, dtype="bfloat16")
  experiment.causal_lm_run(c, max_seq_len=8192, batch_size=8, learning_rate=3e-4)
  if arg == "tiny":
    c.model.update(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, intermediate_size=128,
                   sliding_window=16, layer_types=[ALTERNATING[i % 2] for i in range(4)],
                   query_pre_attn_scalar=32.0, max_position_embeddings=128, dtype="float32")
    experiment.tiny_run(c)
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use configs/gemma2_2b.py or :tiny")
  return c
