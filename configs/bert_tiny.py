"""BERT-Tiny (2 layers, 128 wide, 2 heads: the shape of google/bert_uncased_L-2_H-128_A-2)
pretrained with MLM + NSP on the embedded corpus.

  python -m jaxlm.main --config=configs/bert_tiny.py --workdir=runs/bert_tiny

`configs/bert_tiny.py:tiny` shrinks the run to a few seconds; `:bench` is the BERT-MLM
shape of benchmarks/train_throughput.py (hidden 256, 4 layers, seq 128, batch 16).
"""

from jaxlm import experiment


def get_config(arg=None):
  c = experiment.base_config()
  c.model.update(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=512, max_position_embeddings=512)
  c.tokenizer.vocab_size = 8192
  c.data.max_seq_len = 128
  c.train.update(steps=2000, batch_size=32, learning_rate=1e-3, warmup_steps=200,
                 eval_every=500)
  c.checkpoint.every = 500
  if arg == "tiny":
    c.tokenizer.vocab_size = 1024
    c.data.max_seq_len = 64
    c.train.update(steps=10, batch_size=8, warmup_steps=2, eval_every=5, log_every=5)
    c.eval.update(max_batches=2, fill_mask_examples=1)
    c.checkpoint.every = 5
  elif arg == "bench":
    experiment.bench_run(c, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=1024, max_seq_len=128, batch_size=16)
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use configs/bert_tiny.py, :tiny or :bench")
  return c
