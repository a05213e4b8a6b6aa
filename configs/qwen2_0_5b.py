"""Qwen2-0.5B shape (24 layers, 896 wide, 14 query heads over 2 KV heads of 64 dims, SwiGLU
4864, RMSNorm, biases on the q/k/v projections only, RoPE theta 1e6, full attention on
every layer, tied LM head) as a causal LM on the embedded corpus.

  python -m jaxlm.main --config=configs/qwen2_0_5b.py --workdir=runs/qwen2_0_5b

The vocabulary is trained on the corpus (Qwen2's own is 151936 tokens, with which the model
has 494,032,768 parameters, as transformers counts them); everything else is the published
shape (Qwen/Qwen2-0.5B). The full size validates and builds abstractly here
(`python -m jaxlm.report --config=configs/qwen2_0_5b.py` sizes it);
`configs/qwen2_0_5b.py:tiny` keeps the architecture (GQA 4:1, q/k/v biases, tied head) and
trains in seconds on a CPU. Start from a real checkpoint with `--config.model.init_from=DIR`
(a Hugging Face Qwen2 directory).
"""

from jaxlm import experiment


def get_config(arg=None):
  c = experiment.base_config()
  c.model.update(
      model_type="qwen2", architectures=["Qwen2ForCausalLM"], causal=True,
      hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
      intermediate_size=4864, hidden_act="silu", mlp_type="gated", mlp_bias=False,
      attention_bias=True, attention_out_bias=False, norm_type="rmsnorm", norm_position="pre",
      layer_norm_eps=1e-6, position_embedding_type="rope", rope_theta=1e6,
      max_position_embeddings=32768, type_vocab_size=0, tie_word_embeddings=True,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, dtype="bfloat16")
  experiment.causal_lm_run(c, max_seq_len=4096, batch_size=16, learning_rate=3e-4)
  if arg == "tiny":
    c.model.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=1, intermediate_size=128, max_position_embeddings=128,
                   dtype="float32")
    experiment.tiny_run(c)
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use configs/qwen2_0_5b.py or :tiny")
  return c
