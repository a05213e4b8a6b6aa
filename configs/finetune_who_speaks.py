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
  experiment.finetune_run(c, objective="extractive_qa", dataset="who_speaks", steps=1500,
                          learning_rate=5e-4, metric="exact_match", eval_every=250)
  c.model.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
  c.finetune.head_learning_rate = 1e-3
  c.train.warmup_steps = 100
  if arg == "tiny":
    experiment.finetune_tiny(c)
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use :tiny")
  return c
