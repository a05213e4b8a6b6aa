"""The main job's README figures, rerun: README command (1) (configs/default.py) end to end
in a fresh workdir, plus its ablations, each as the CLI runs it.

  python benchmarks/mainjob.py                       # main job + ablations (~20 min, 2 cores)
  python benchmarks/mainjob.py --runs main           # only the main job
  python benchmarks/mainjob.py --out benchmarks/results/mainjob-DATE.json

Runs (`--runs`, comma-separated):
  main      configs/default.py as is (rotary positions, MLM + NSP)
  absolute  the same with a learned absolute position table (model.position_embedding_type)
  sop       configs/bert_sop.py: the same model with MLM + sentence-order prediction

Records per run: wall seconds of the whole command (corpus preparation, compiles, training,
evaluation, export), the report's validation/test metrics and the unigram baseline, and
the machine (CPU model, AMX or not, cores). Prints JSON and writes it with --out.
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

RUNS = {
    "main": ("configs/default.py", []),
    "absolute": ("configs/default.py", ["--config.model.position_embedding_type=absolute"]),
    "sop": ("configs/bert_sop.py", []),
}
KEYS = ("val_loss", "test_loss", "val_mlm_perplexity", "test_mlm_perplexity",
        "val_mlm_accuracy", "test_mlm_accuracy", "val_nsp_accuracy", "test_nsp_accuracy",
        "val_sop_accuracy", "test_sop_accuracy", "unigram_perplexity", "params", "steps",
        "tokens_seen", "train_seconds")


def run(name: str, workdir: str) -> dict:
  config, extra = RUNS[name]
  cmd = [sys.executable, "-m", "jaxlm.main", f"--config={os.path.join(ROOT, config)}",
         f"--workdir={workdir}", *extra]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if proc.returncode:
    return {"command": " ".join(cmd[1:]), "error": proc.stderr.strip().splitlines()[-1:]}
  with open(os.path.join(workdir, "report.json"), encoding="utf-8") as f:
    rep = json.load(f)
  return {"command": "python " + " ".join(cmd[1:]).replace(ROOT + "/", ""),
          "wall_seconds": round(wall, 1), **{k: rep[k] for k in KEYS if k in rep}}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--runs", default="main,absolute,sop")
  ap.add_argument("--out", default=None)
  a = ap.parse_args()
  doc = {"benchmark": "mainjob", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": _cpu(),
         "runs": {}}
  with tempfile.TemporaryDirectory() as tmp:
    for name in a.runs.split(","):
      doc["runs"][name] = run(name, os.path.join(tmp, name))
      print(f"{name}: {doc['runs'][name]}", file=sys.stderr, flush=True)
  text = json.dumps(doc, indent=1)
  write_json(text, a.out)
  print(text)


if __name__ == "__main__":
  main()
