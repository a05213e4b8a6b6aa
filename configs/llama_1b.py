"""Llama 3.2 1B shape (16 layers, 2048 wide, 32 heads with 8 KV heads, SwiGLU 8192,
RMSNorm, RoPE theta 500000 with llama3 scaling, tied LM head) as a causal LM on the
embedded corpus.

  python -m jaxlm.main --config=configs/llama_1b.py --workdir=runs/llama_1b

The vocabulary is trained on the corpus (vocab_size follows the tokenizer); everything
else is the published shape. Far too big to train well on a CPU; `configs/llama_1b.py:tiny`
keeps the architecture and shrinks it to a seconds-long run. Start from a real
checkpoint with `--config.model.init_from=DIR` (a Hugging Face Llama directory).
"""

from jaxlm import experiment


def get_config(arg=None):
  c = experiment.base_config()
  c.model.update(
      model_type="llama", architectures=["LlamaForCausalLM"], causal=True,
      hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
      intermediate_size=8192, hidden_act="silu", mlp_type="gated", mlp_bias=False,
      attention_bias=False, norm_type="rmsnorm", norm_position="pre", layer_norm_eps=1e-5,
      position_embedding_type="rope", rope_theta=500000.0,
      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
      max_position_embeddings=131072, type_vocab_size=0, tie_word_embeddings=True,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, dtype="bfloat16")
  experiment.causal_lm_run(c, max_seq_len=1024, batch_size=8, learning_rate=3e-4)
  if arg == "tiny":
    # Same family, toy size: GQA (4 query heads over 2 KV heads) and llama3 RoPE scaling
    # with an original context of 32 tokens, so the scaling bands all show up.
    c.model.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                   dtype="float32",
                   rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 32})
    experiment.tiny_run(c)
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use configs/llama_1b.py or :tiny")
  return c
