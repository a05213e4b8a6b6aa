"""A tiny BLOOM (ALiBi attention biases instead of position embeddings, a LayerNorm
straight after the token embedding, pre-LN blocks, gelu_new, tied LM head) pretrained
as a causal LM on the embedded corpus.

  python -m jaxlm.main --config=configs/bloom_tiny.py --workdir=runs/bloom_tiny

A few minutes on a CPU; `configs/bloom_tiny.py:tiny` shrinks it to seconds.
"""

from jaxlm import experiment


def get_config(arg=None):
  c = experiment.base_config()
  c.model.update(
      model_type="bloom", architectures=["BloomForCausalLM"], causal=True,
      hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1024,
      hidden_act="gelu_new", norm_type="layernorm", norm_position="pre", layer_norm_eps=1e-5,
      embedding_norm=True, position_embedding_type="alibi",
      # ALiBi has no position table; this is only the longest row we vouch for.
      max_position_embeddings=2048, type_vocab_size=0, tie_word_embeddings=True,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  c.tokenizer.vocab_size = 8192
  c.data.max_seq_len = 128
  c.train.update(objective="causal", steps=1200, batch_size=32, learning_rate=1e-3,
                 warmup_steps=100, decay="cosine", end_learning_rate_factor=0.1,
                 weight_decay=0.1, b2=0.95, eval_every=300)
  c.checkpoint.every = 300
  if arg == "tiny":
    c.model.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=256)
    experiment.tiny_run(c)
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use configs/bloom_tiny.py or :tiny")
  return c
