"""Command line: python -m jaxlm.main --config=configs/default.py --workdir=DIR [--mode=...]

Thin on purpose: all logic lives in importable modules. User errors (bad config,
missing or unreadable data) print one line and exit with status 2.

Multi-host: every host runs the same command. On a TPU pod slice, under Slurm or Open
MPI, JAX finds the other processes itself; elsewhere give --coordinator_address,
--num_processes and --process_id on each host (see README, "Scaling out").
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxlm.cli import fail as _fail
from jaxlm.cli import one_line as _one_line
from jaxlm.cli import parse_flags, tune_malloc
from jaxlm.errors import JaxlmError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for data, checkpoints, metrics.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "generate", "finetune", "index",
                                           "rag"], "What to run (index: build WORKDIR/index "
                          "from data.source; rag: answer from it).")
_PROMPT = flags.DEFINE_string("prompt", None, "--mode=generate/rag: one prompt.")
_PROMPTS = flags.DEFINE_string("prompts_file", None, "--mode=generate/rag: prompts, one a "
                               "line or JSONL with a \"prompt\" field.")
_OUTPUT = flags.DEFINE_string("output", None, "--mode=generate/rag: JSONL out (or stdout).")
_FRESH = flags.DEFINE_bool("fresh", False, "Start over: move the workdir's checkpoints (or "
                           "--mode=index: its index) aside.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: HOST:PORT of process 0, the same on every "
    "process (default: what JAX detects on a TPU pod, Slurm or Open MPI).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: how many "
                                      "processes join the job.", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's id, "
                                   "0 .. --num_processes - 1 (0 is the primary).",
                                   lower_bound=0)


def main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax/absl INFO chatter drowns the progress bar
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  generating = _MODE.value == "generate"
  try:
    cfg = _CONFIG.value
    if cfg is None and generating:  # a model directory needs no experiment config
      from jaxlm.experiment import base_config
      cfg = base_config()
    if cfg is None:
      _fail("--config is required (e.g. --config=configs/default.py)")
  except (OSError, ImportError, AttributeError, KeyError, TypeError, ValueError,
          SyntaxError) as e:
    _fail(f"--config: {_one_line(e)}")
  if not _WORKDIR.value and not (generating and cfg.model.init_from):
    _fail("--workdir is required")
  if os.environ.get("JAXLM_MALLOC_TUNING", "1") == "1":
    tune_malloc()
  from jaxlm.parallel import distributed  # heavy imports after the cheap checks
  try:
    # Before anything touches JAX devices: joining a job changes what they are.
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except JaxlmError as e:
    _fail(_one_line(e))
  from jaxlm.train import loop
  try:
    if generating:
      from jaxlm.generate import cli
      cli.run(cfg, _WORKDIR.value or "", prompt=_PROMPT.value, prompts_file=_PROMPTS.value,
              output=_OUTPUT.value)
    elif _MODE.value in ("index", "rag"):
      from jaxlm.retrieval import cli as rag_cli
      rag_cli.main(_MODE.value, cfg, _WORKDIR.value, fresh=_FRESH.value, prompt=_PROMPT.value,
                   prompts_file=_PROMPTS.value, output=_OUTPUT.value)
    elif _MODE.value == "eval":
      loop.evaluate(cfg, _WORKDIR.value)
    else:
      run = loop.finetune if _MODE.value == "finetune" else loop.train
      run(cfg, _WORKDIR.value, fresh=_FRESH.value)
  except loop.Preempted as e:  # 128 + signal: the job did not finish; a requeue resumes it
    print(_one_line(e), file=sys.stderr)
    sys.exit(128 + int(e.signum))
  except loop.NonFinite as e:  # 3: training diverged (not a bad input)
    print(f"error: {_one_line(e)}", file=sys.stderr)
    sys.exit(3)
  except JaxlmError as e:
    _fail(_one_line(e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
