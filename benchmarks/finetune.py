"""The fine-tuning figures of the README, rerun: the main job (README command (1)) and a
small GPT pretrain, then each embedded fine-tuning task from them, as the CLI runs it.

  python benchmarks/finetune.py --out benchmarks/results/finetune-DATE.json   # ~45 min
  python benchmarks/finetune.py --workdirs runs    # keep (or reuse) the workdirs there
  python benchmarks/finetune.py --collect runs     # only read the reports of finished runs

Runs: `mainjob` (configs/default.py), `gpt_mini` (configs/gpt2_small.py:mini), then from
them `genre` (configs/finetune_genre.py), `genre_lora` (:lora), `genre_scratch`
(:scratch), `who_speaks` and `next_speaker`. A run whose workdir already holds a
report.json is not run again. Records each run's test metrics, baselines, trained and
total parameters, and the machine. Prints JSON and writes it with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from behaviour import _cpu  # noqa: E402  (benchmarks/behaviour.py)
from common import write_json  # noqa: E402

# name -> (mode, config, the run it starts from)
RUNS = {
    "mainjob": ("train", "configs/default.py", None),
    "gpt_mini": ("train", "configs/gpt2_small.py:mini", None),
    "genre": ("finetune", "configs/finetune_genre.py", "mainjob"),
    "genre_lora": ("finetune", "configs/finetune_genre.py:lora", "mainjob"),
    "genre_scratch": ("finetune", "configs/finetune_genre.py:scratch", "mainjob"),
    "who_speaks": ("finetune", "configs/finetune_who_speaks.py", "mainjob"),
    "next_speaker": ("finetune", "configs/finetune_next_speaker.py", "gpt_mini"),
}
KEYS = ("test_accuracy", "test_macro_f1", "test_majority_baseline_accuracy", "val_accuracy",
        "val_macro_f1", "val_majority_baseline_accuracy", "test_scene_accuracy",
        "test_scene_macro_f1", "test_scene_majority_baseline_accuracy", "test_scenes",
        "test_exact_match", "test_f1", "test_baseline_exact_match", "test_text_exact_match",
        "test_text_f1", "val_exact_match", "val_baseline_exact_match",
        "test_generated_exact_match", "test_generated_rougeL", "test_majority_exact_match",
        "test_majority_rougeL", "test_generated_examples", "majority_response",
        "test_mlm_perplexity", "test_perplexity", "params", "trained_params", "steps",
        "best_step", "train_seconds")


def run(name: str, root: str) -> dict:
  mode, config, base = RUNS[name]
  workdir = os.path.join(root, name)
  cmd = [sys.executable, "-m", "jaxlm.main", f"--mode={mode}",
         f"--config={os.path.join(ROOT, config)}", f"--workdir={workdir}"]
  if base:
    cmd.append(f"--config.model.init_from={os.path.join(root, base)}")
  shown = "python " + " ".join(cmd[1:]).replace(ROOT + "/", "").replace(root + "/", "runs/")
  if not os.path.exists(os.path.join(workdir, "report.json")):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
      return {"command": shown, "error": proc.stderr.strip().splitlines()[-1:]}
  return {"command": shown, **collect(workdir)}


def collect(workdir: str) -> dict:
  with open(os.path.join(workdir, "report.json"), encoding="utf-8") as f:
    rep = json.load(f)
  return {k: rep[k] for k in KEYS if k in rep}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--runs", default=",".join(RUNS))
  ap.add_argument("--workdirs", default=None, help="where the runs live (default: a temp dir)")
  ap.add_argument("--collect", default=None, help="only read DIR/<run>/report.json")
  ap.add_argument("--out", default=None)
  a = ap.parse_args()
  doc = {"benchmark": "finetune", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": _cpu(),
         "runs": {}}
  with tempfile.TemporaryDirectory() as tmp:
    root = a.collect or a.workdirs or tmp
    for name in a.runs.split(","):
      if a.collect:
        if os.path.exists(os.path.join(root, name, "report.json")):
          doc["runs"][name] = {"command": RUNS[name][1], **collect(os.path.join(root, name))}
        continue
      doc["runs"][name] = run(name, root)
      print(f"{name}: {doc['runs'][name]}", file=sys.stderr, flush=True)
  text = json.dumps(doc, indent=1)
  write_json(text, a.out)
  print(text)


if __name__ == "__main__":
  main()
