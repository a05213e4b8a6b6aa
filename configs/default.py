"""The main job: pretrain a small BERT (MLM + NSP) on the embedded Shakespeare corpus.

  python -m jaxlm.main --config=configs/default.py --workdir=runs/default

A rerun with the same --workdir resumes from the latest checkpoint. Variants:
`configs/default.py:tiny` is a seconds-long smoke run. Override any key with
`--config.train.steps=200` and the like.

Sized to finish in a few minutes on a 2-core CPU: a 4-layer, 256-wide encoder with
128-token sequences; dropout is off because a one-epoch run underfits rather than
overfits.
"""

from jaxlm import experiment


def get_config(arg=None):
  c = experiment.base_config()
  c.model.update(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=1024, max_position_embeddings=128,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  c.tokenizer.vocab_size = 8192
  c.data.max_seq_len = 128
  c.train.update(steps=1200, batch_size=32, learning_rate=1e-3, warmup_steps=100,
                 eval_every=300, log_every=20)
  c.checkpoint.every = 300
  if arg == "tiny":
    c.model.update(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=64)
    c.tokenizer.vocab_size = 1024
    c.data.max_seq_len = 64
    c.train.update(steps=20, batch_size=8, warmup_steps=5, eval_every=10, log_every=5)
    c.eval.update(batch_size=32, max_batches=2, fill_mask_examples=2)
    c.checkpoint.every = 10
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use configs/default.py or :tiny")
  return c
