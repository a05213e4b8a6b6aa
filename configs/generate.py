"""Generation from any model directory (Hugging Face or jaxlm, with its tokenizer): the
`generate` keys at their defaults, for --mode=generate when no training config applies.

  python -m jaxlm.main --config=configs/generate.py --mode=generate \\
      --config.model.init_from=path/to/model --prompt="To be, or not to be" \\
      --config.generate.max_new_tokens=32 --config.generate.temperature=0.7

A training workdir needs no config: `--mode=generate --workdir=runs/x --prompt=...` reads
its exported model and tokenizer (pass the run's own --config to override generate keys).
"""

from jaxlm import experiment


def get_config(arg=None):
  if arg:
    raise ValueError(f"configs/generate.py takes no variant, got {arg!r}")
  return experiment.base_config()
