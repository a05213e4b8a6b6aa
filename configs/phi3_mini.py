"""Phi-3-mini shape (3.8B: 32 layers, 3072 wide, 32 heads of 96 dims with as many KV heads,
SwiGLU 8192 stored as one fused gate_up_proj, fused qkv_proj, RMSNorm eps 1e-5, RoPE theta
10000 on every dim, a 2047-token sliding window over 4096 positions, untied LM head) as a
causal LM on the embedded corpus.

  python -m jaxlm.main --config=configs/phi3_mini.py --workdir=runs/phi3_mini

The vocabulary is trained on the corpus (Phi-3's own is 32064); everything else is the
published shape (microsoft/Phi-3-mini-4k-instruct, transformers' Phi3Config defaults). The
full size validates and builds abstractly here (`python -m jaxlm.report
--config=configs/phi3_mini.py` sizes it); `configs/phi3_mini.py:tiny` keeps the
architecture, with a 16-token window (rows are 64), and trains in seconds on a CPU. Start
from a real checkpoint with `--config.model.init_from=DIR` (a Hugging Face Phi-3 directory;
the 128k variants' longrope scaling loads too).
"""

from jaxlm import experiment


def get_config(arg=None):
  c = experiment.base_config()
  c.model.update(
      model_type="phi3", architectures=["Phi3ForCausalLM"], causal=True,
      hidden_size=3072, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
      intermediate_size=8192, hidden_act="silu", mlp_type="gated", mlp_bias=False,
      attention_bias=False, norm_type="rmsnorm", norm_position="pre", layer_norm_eps=1e-5,
      sliding_window=2047, position_embedding_type="rope", rope_theta=10000.0,
      max_position_embeddings=4096, type_vocab_size=0, tie_word_embeddings=False,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, dtype="bfloat16")
  experiment.causal_lm_run(c, max_seq_len=4096, batch_size=8, learning_rate=3e-4)
  if arg == "tiny":
    c.model.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, intermediate_size=128, sliding_window=16,
                   max_position_embeddings=128, dtype="float32")
    experiment.tiny_run(c)
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use configs/phi3_mini.py or :tiny")
  return c
