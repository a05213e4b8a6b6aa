"""T5-small shape (6 + 6 layers, 512 wide, 8 heads of 64, ReLU feed-forward 2048, relative
position buckets 32 / max distance 128, tied embeddings) pretrained with span corruption
on the embedded corpus.

  python -m jaxlm.main --config=configs/t5_small.py --workdir=runs/t5_small

Span corruption as T5: 15% of the tokens in spans of mean length 3, each span replaced by
a sentinel in the inputs (`data.max_seq_len` tokens after corruption) and listed after its
sentinel in the targets. The vocabulary is trained on the corpus and the 100 sentinels are
appended to it. `configs/t5_small.py:tiny` is a seconds-long run; set
`--config.model.mlp_type=gated --config.model.hidden_act=gelu_new
--config.model.tie_word_embeddings=False` for the T5 v1.1 layout.
"""

from jaxlm import experiment


def get_config(arg=None):
  c = experiment.base_config()
  c.model.update(
      model_type="t5", architectures=["T5ForConditionalGeneration"], hidden_size=512,
      num_hidden_layers=6, num_decoder_layers=6, num_attention_heads=8, head_dim=64,
      intermediate_size=2048, hidden_act="relu", mlp_type="plain", mlp_bias=False,
      attention_bias=False, norm_type="rmsnorm", norm_position="pre", layer_norm_eps=1e-6,
      position_embedding_type="relative", relative_attention_num_buckets=32,
      relative_attention_max_distance=128, max_position_embeddings=512, type_vocab_size=0,
      tie_word_embeddings=True, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
      dtype="bfloat16")
  c.tokenizer.vocab_size = 8192
  c.data.max_seq_len = 128
  c.train.update(objective="span_corruption", steps=2000, batch_size=32, learning_rate=1e-3,
                 warmup_steps=200, decay="cosine", end_learning_rate_factor=0.1,
                 eval_every=250)
  c.eval.update(batch_size=32, max_batches=20)
  c.checkpoint.every = 250
  if arg == "tiny":
    c.model.update(hidden_size=64, num_hidden_layers=2, num_decoder_layers=2,
                   num_attention_heads=4, head_dim=16, intermediate_size=128,
                   relative_attention_num_buckets=16, relative_attention_max_distance=32,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, dtype="float32")
    experiment.tiny_run(c)
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use configs/t5_small.py or :tiny")
  return c
