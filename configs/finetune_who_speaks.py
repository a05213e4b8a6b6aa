"""Extractive QA on the embedded "who speaks" task, from the main job's BERT.

  python -m jaxlm.main --mode=finetune --config=configs/finetune_who_speaks.py \\
      --workdir=runs/who_speaks --config.model.init_from=runs/default

The context is a stretch of dialogue ("NAME: speech ..."), the question one quoted line;
the answer is the span naming that line's speaker. Split by play (jaxlm/data/labeled.py).
The baseline answers the most frequent speaker in the context. `:tiny` is a smoke run.
"""

from jaxlm import experiment


def get_config(arg=None):
  c = experiment.base_config()
  c.model.init_from = "runs/default"
  c.model.update(dtype="bfloat16", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
  c.train.objective = "extractive_qa"
  c.finetune.dataset = "who_speaks"
  c.data.max_seq_len = 128
  c.train.update(steps=1500, batch_size=32, learning_rate=5e-4, warmup_steps=100,
                 eval_every=250, log_every=50, early_stopping_metric="exact_match",
                 keep_best=True)
  c.finetune.head_learning_rate = 1e-3
  c.eval.batch_size = 128
  c.checkpoint.every = 250
  if arg == "tiny":
    c.train.update(steps=6, batch_size=8, warmup_steps=1, eval_every=3, log_every=3)
    c.eval.update(batch_size=32, max_batches=2)
    c.checkpoint.every = 3
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use :tiny")
  return c
