"""GPT-2 small (124M: 12 layers, 768 wide, 12 heads, learned positions, pre-LN,
gelu_new, tied LM head) pretrained as a causal LM on the embedded corpus.

  python -m jaxlm.main --config=configs/gpt2_small.py --workdir=runs/gpt2_small

The vocabulary is a WordPiece trained on the corpus (the model's vocab_size follows it),
so the shape is GPT-2's except for the embedding rows. `configs/gpt2_small.py:tiny`
shrinks the model and the run to seconds; `:mini` is a 4-layer, 128-wide decoder
trained for ~5 minutes (the start of configs/finetune_next_speaker.py); `:rag` the same
on 256-token rows (the generator configs/rag.py tunes); `:medium` a
6-layer, 384-wide one (the speculative-decoding target of benchmarks/compress_spec.py); `:bench` is the GPT shape of
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
  elif arg == "mini":  # ~5 min on 2 CPU cores; the decoder configs/finetune_next_speaker.py tunes
    _small_run(c, width=128, layers=4, heads=4, max_positions=128, steps=2000, batch_size=32,
               learning_rate=2e-3, every=500)
  elif arg == "rag":  # :mini with 256-token rows: the generator of configs/rag.py
    _small_run(c, width=128, layers=4, heads=4, max_positions=256, steps=2000, batch_size=16,
               learning_rate=2e-3, every=500)
    c.data.max_seq_len = 256
  elif arg == "medium":  # ~10 min here: the target of benchmarks/compress_spec.py (a decode
    # step costs ~9x the 2-layer draft's, so speculation can pay; at :mini it cannot)
    _small_run(c, width=384, layers=6, heads=6, max_positions=256, steps=600, batch_size=16,
               learning_rate=1e-3, every=300)
  elif arg == "bench":
    experiment.bench_run(c, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=1024, max_seq_len=256, batch_size=8,
                         dtype="float32")
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use configs/gpt2_small.py, :tiny, :mini, "
                     ":rag, :medium or :bench")
  return c


def _small_run(c, *, width, layers, heads, max_positions, steps, batch_size, learning_rate,
               every):
  """A smaller GPT-2 (4x MLP, no dropout) on a 4,096-token vocabulary, 128-token rows."""
  c.model.update(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                 intermediate_size=4 * width, max_position_embeddings=max_positions,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  c.tokenizer.vocab_size = 4096
  c.data.max_seq_len = 128
  c.train.update(steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                 warmup_steps=min(100, steps // 10), eval_every=every, log_every=50)
  c.eval.update(batch_size=64, max_batches=10)
  c.checkpoint.every = every
