"""Gemma 2B shape (18 layers, 2048 wide, 8 query heads over 1 KV head of 256 dims, GeGLU
16384 with tanh GELU, RMSNorm scaled by (1 + w), embeddings times sqrt(2048), RoPE theta
10000, tied LM head) as a causal LM on the embedded corpus.

  python -m jaxlm.main --config=configs/gemma_2b.py --workdir=runs/gemma_2b

The vocabulary is trained on the corpus (vocab_size follows the tokenizer; Gemma's own is
256000); everything else is the published shape (google/gemma-2b). The full size is meant
for sharded accelerator runs (it validates and builds abstractly here, and
`python -m jaxlm.report --config=configs/gemma_2b.py` sizes it); `configs/gemma_2b.py:tiny`
keeps the architecture (MQA, head_dim apart from hidden / heads) and trains in seconds on a
CPU. Start from a real checkpoint with `--config.model.init_from=DIR` (a Hugging Face Gemma
directory).
"""

from jaxlm import experiment


def get_config(arg=None):
  c = experiment.base_config()
  c.model.update(
      model_type="gemma", architectures=["GemmaForCausalLM"], causal=True,
      hidden_size=2048, num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1,
      head_dim=256, intermediate_size=16384, hidden_act="gelu_pytorch_tanh", mlp_type="gated",
      mlp_bias=False, attention_bias=False, norm_type="rmsnorm", norm_position="pre",
      norm_scale_offset=1.0, scale_embeddings=True, layer_norm_eps=1e-6,
      position_embedding_type="rope", rope_theta=10000.0, max_position_embeddings=8192,
      type_vocab_size=0, tie_word_embeddings=True, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, dtype="bfloat16")
  experiment.causal_lm_run(c, max_seq_len=8192, batch_size=8, learning_rate=3e-4)
  if arg == "tiny":
    c.model.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=1, head_dim=32, intermediate_size=128,
                   max_position_embeddings=128, dtype="float32")
    experiment.tiny_run(c)
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use configs/gemma_2b.py or :tiny")
  return c
