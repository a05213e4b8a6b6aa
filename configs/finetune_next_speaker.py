"""Instruction tuning (SFT) of a small decoder on the embedded "next speaker" task.

  python -m jaxlm.main --config=configs/gpt2_small.py:mini --workdir=runs/gpt_mini
  python -m jaxlm.main --mode=finetune --config=configs/finetune_next_speaker.py \\
      --workdir=runs/next_speaker --config.model.init_from=runs/gpt_mini

The prompt is up to three speeches ("NAME: speech") and "Who speaks next?"; the response
is the next speaker's name. The loss is on the response tokens only; rows pack several
pairs (segment ids). At the end, greedy answers to test prompts are scored with exact
match and ROUGE-L next to the majority baseline. Split by play. `:tiny` is a smoke run.
"""

from jaxlm import experiment


def get_config(arg=None):
  c = experiment.base_config()
  experiment.finetune_run(c, objective="sft", dataset="next_speaker", steps=800,
                          learning_rate=5e-4, metric="loss", eval_every=200)
  c.model.init_from = "runs/gpt_mini"
  c.eval.update(batch_size=64, max_batches=10)
  c.finetune.generate_examples = 400
  if arg == "tiny":
    experiment.finetune_tiny(c)
    c.eval.batch_size = 16
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use :tiny")
  return c
