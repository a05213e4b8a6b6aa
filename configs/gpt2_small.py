"""GPT-2 small (124M: 12 layers, 768 wide, 12 heads, learned positions, pre-LN,
gelu_new, tied LM head) pretrained as a causal LM on the embedded corpus.

  python -m jaxlm.main --config=configs/gpt2_small.py --workdir=runs/gpt2_small

The vocabulary is a WordPiece trained on the corpus (the model's vocab_size follows it),
so the shape is GPT-2's except for the embedding rows. `configs/gpt2_small.py:tiny`
shrinks the model and the run to seconds; `:bench` is the GPT shape of
benchmarks/train_throughput.py (d 256, 4 layers, seq 256, batch 8). To continue from a checkpoint instead
(architecture and tokenizer then come from DIR):

  python -m jaxlm.main --config=configs/gpt2_small.py --workdir=runs/ft \\
      --config.model.init_from=DIR
"""

from jaxlm import experiment


def get_config(arg=None):
  c = experiment.base_config()
  c.model.update(
      model_type="gpt2", architectures=["GPT2LMHeadModel"], causal=True,
      hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
      hidden_act="gelu_new", norm_type="layernorm", norm_position="pre", layer_norm_eps=1e-5,
      position_embedding_type="absolute", max_position_embeddings=1024, type_vocab_size=0,
      tie_word_embeddings=True, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
      dtype="bfloat16")  # bf16 matmuls with f32 params: AMX speed
      # (docs/performance.md#cpu-matmuls-and-dtypes)
  experiment.causal_lm_run(c, max_seq_len=512, batch_size=16, learning_rate=6e-4)
  if arg == "tiny":
    c.model.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=256, max_position_embeddings=64, dtype="float32",
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    experiment.tiny_run(c)
  elif arg == "bench":
    experiment.bench_run(c, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=1024, max_seq_len=256, batch_size=8,
                         dtype="float32")
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use configs/gpt2_small.py, :tiny or :bench")
  return c
