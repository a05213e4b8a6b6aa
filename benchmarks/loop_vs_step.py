"""Does the real training loop keep up with the bare train step?

For each model (gpt, bert) and precision, alternately runs (A B A B over --rounds, fresh
processes, the same environment):

  loop: python -m jaxlm.main --config=configs/<gpt2_small|bert_tiny>.py:bench (the
        benchmark's shapes, real data from the embedded corpus: tokenizer, packing or
        masking, the grain pipeline, metrics, the final checkpoint and report)
  step: benchmarks/train_throughput.py --framework jaxlm on the same shapes (one
        synthetic batch, nothing else)

The loop's throughput is B*T / step_time_s from metrics.jsonl (median over the logged
intervals after the first, which holds the compile), so padding in BERT rows does not
count against it; `tokens_per_s` (real tokens only) is recorded too. Prints JSON and a
Markdown line per case; writes benchmarks/results/loop_vs_step-<date>.json.

  python benchmarks/loop_vs_step.py [--models gpt,bert] [--precisions fp32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from common import write_json  # noqa: E402
from run_cpu import BENCH_ENV, machine_info  # noqa: E402

CONFIG = {"gpt": "configs/gpt2_small.py:bench", "bert": "configs/bert_tiny.py:bench"}
SHAPE = {"gpt": (8, 256), "bert": (16, 128)}


def run_loop(model, precision, steps, env, timeout) -> dict:
  workdir = tempfile.mkdtemp(prefix=f"loop_{model}_")
  try:
    cmd = [sys.executable, "-m", "jaxlm.main", f"--config={CONFIG[model]}",
           f"--workdir={workdir}", f"--config.train.steps={steps}",
           f"--config.train.eval_every={steps}", f"--config.checkpoint.every={steps}",
           f"--config.train.precision={precision}"]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode != 0:
      return {"error": p.returncode, "stderr_tail": p.stderr[-2000:]}
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      rows = [r for r in map(json.loads, f) if "step_time_s" in r]
    B, T = SHAPE[model]
    counted = rows[1:]  # the first interval holds the compile
    return {"intervals": len(counted),
            "batch_tokens_per_s": B * T / statistics.median(r["step_time_s"] for r in counted),
            "real_tokens_per_s": statistics.median(r["tokens_per_s"] for r in counted),
            "mfu": statistics.median(r["mfu"] for r in counted) if "mfu" in counted[0] else None}
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def run_step(model, precision, steps, env, timeout) -> dict:
  cmd = [sys.executable, os.path.join(HERE, "train_throughput.py"), "--framework", "jaxlm",
         "--model", model, "--precision", precision, "--steps", str(steps)]
  p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
  if p.returncode != 0 or not lines:
    return {"error": p.returncode, "stderr_tail": p.stderr[-2000:]}
  return {"batch_tokens_per_s": json.loads(lines[-1])["tokens_per_s"]}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--models", default="gpt,bert")
  ap.add_argument("--precisions", default="fp32")
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--loop-steps", type=int, default=60)
  ap.add_argument("--step-steps", type=int, default=20)
  ap.add_argument("--timeout", type=float, default=900)
  ap.add_argument("--out", default=None)
  a = ap.parse_args()
  env = {**os.environ, **BENCH_ENV, "PYTHONPATH": ROOT}
  summary = []
  for model in a.models.split(","):
    for precision in a.precisions.split(","):
      loops, steps = [], []
      for _ in range(a.rounds):
        loops.append(run_loop(model, precision, a.loop_steps, env, a.timeout))
        steps.append(run_step(model, precision, a.step_steps, env, a.timeout))
        print(json.dumps({"model": model, "precision": precision, "loop": loops[-1],
                          "step": steps[-1]}), flush=True)
      lv = [r["batch_tokens_per_s"] for r in loops if "batch_tokens_per_s" in r]
      sv = [r["batch_tokens_per_s"] for r in steps if "batch_tokens_per_s" in r]
      row = {"model": model, "precision": precision, "loop_runs": loops, "step_runs": steps}
      if lv and sv:
        row.update(loop_tokens_per_s=statistics.median(lv),
                   step_tokens_per_s=statistics.median(sv),
                   ratio=statistics.median(lv) / statistics.median(sv))
      summary.append(row)
  doc = {"benchmark": "loop_vs_step", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
         "machine": machine_info(), "env": BENCH_ENV, "rounds": a.rounds, "summary": summary}
  out = a.out or os.path.join(HERE, "results", f"loop_vs_step-{time.strftime('%Y%m%d')}.json")
  write_json(json.dumps(doc, indent=1), out, out_name="loop_vs_step.json")
  print("| model | precision | loop tok/s | bare step tok/s | loop / step |")
  print("|---|---|---|---|---|")
  for r in summary:
    if "ratio" in r:
      print(f"| {r['model']} | {r['precision']} | {r['loop_tokens_per_s']:,.0f} | "
            f"{r['step_tokens_per_s']:,.0f} | {r['ratio']:.2f} |")


if __name__ == "__main__":
  main()
