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
  c.model.init_from = "runs/gpt_mini"
  c.model.update(dtype="bfloat16")
  c.train.objective = "sft"
  c.finetune.dataset = "next_speaker"
  c.data.max_seq_len = 128
  c.train.update(steps=800, batch_size=32, learning_rate=5e-4, warmup_steps=50,
                 eval_every=200, log_every=50, keep_best=True)
  c.eval.update(batch_size=64, max_batches=10)
  c.checkpoint.every = 200
  c.finetune.generate_examples = 400
  if arg == "tiny":
    c.train.update(steps=6, batch_size=8, warmup_steps=1, eval_every=3, log_every=3)
    c.eval.update(batch_size=16, max_batches=2)
    c.checkpoint.every = 3
    c.finetune.generate_examples = 8
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use :tiny")
  return c
