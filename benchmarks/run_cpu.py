"""jaxlm against Hugging Face PyTorch training throughput on this CPU, alternated.

For each (model, precision) the two frameworks run alternately, A B A B over --rounds,
each run a fresh subprocess of benchmarks/train_throughput.py with the same environment
for both sides (PYTHONPATH=repo and the allocator settings BENCH_ENV below).
Collects the JSON lines, writes benchmarks/results/cpu-<date>.json with machine info and
prints a Markdown table of median tokens/s per side, their ratio and peak RSS.

  /work/venv-hf/bin/python benchmarks/run_cpu.py [--models bert,gpt,llama] \\
      [--precisions fp32,bf16] [--rounds 3] [--steps 20] [--warmup 3] [--env hugetlb|old]
      [--out FILE]

The interpreter must have jax/flax and torch/transformers (--python to choose another).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from common import write_json  # noqa: E402

# The same allocator environment for both sides. glibc's transparent-huge-page tunable
# cuts the minor page faults of the large per-step buffers (both frameworks allocate and
# free them every step) by 512x. Measured here on 2026-11-28 against the prototype's
# settings (docs/performance.md#memory-and-allocator: MALLOC_ARENA_MAX=1
# MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=8e9 MALLOC_TOP_PAD_=256MiB): as fast or faster for jaxlm, much faster for torch bf16 (BERT
# ~6.1k -> ~9.3k tok/s), and a stable peak RSS, where those settings let the heap grow by
# 256-350 MiB at random steps. --env old restores them.
BENCH_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
OLD_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
           "MALLOC_TRIM_THRESHOLD_": "8000000000", "MALLOC_TOP_PAD_": "268435456"}


def machine_info() -> dict:
  cpu = platform.processor() or platform.machine()
  flags = ""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name") and cpu in ("", platform.machine()):
          cpu = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
          flags = line
          break
  except OSError:
    pass
  mem = None
  try:
    with open("/proc/meminfo") as f:
      mem = int(f.readline().split()[1]) // 1024
  except OSError:
    pass
  return {"cpu": cpu, "cpu_count": os.cpu_count(),
          "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
          "mem_total_mib": mem, "platform": platform.platform(),
          "python": platform.python_version()}


def run_one(python, fw, model, precision, args, env) -> dict:
  cmd = [python, os.path.join(HERE, "train_throughput.py"), "--framework", fw,
         "--model", model, "--precision", precision, "--steps", str(args.steps),
         "--warmup", str(args.warmup)] + (["--torch-attn", args.torch_attn] if fw == "torch"
                                          else [])
  t0 = time.time()
  p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                     timeout=args.timeout)
  lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
  if p.returncode != 0 or not lines:
    sys.stderr.write(p.stderr[-3000:])
    return {"framework": fw, "model": model, "precision": precision, "error": p.returncode,
            "stderr_tail": p.stderr[-2000:]}
  r = json.loads(lines[-1])
  r["wall_s"] = time.time() - t0
  return r


def med(rs, key):
  v = [r[key] for r in rs if key in r]
  return statistics.median(v) if v else None


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--models", default="bert,gpt,llama")
  ap.add_argument("--precisions", default="fp32,bf16")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--torch-attn", choices=("sdpa", "eager"), default="sdpa")
  ap.add_argument("--python", default=sys.executable)
  ap.add_argument("--timeout", type=int, default=1800, help="seconds per run")
  ap.add_argument("--env", choices=("hugetlb", "old"), default="hugetlb",
                  help="allocator environment for both sides (see BENCH_ENV)")
  ap.add_argument("--out", default=None)
  args = ap.parse_args()

  bench_env = BENCH_ENV if args.env == "hugetlb" else OLD_ENV
  env = dict(os.environ, **bench_env)
  env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  env.setdefault("PYTHONUNBUFFERED", "1")

  runs, rows = [], []
  for model in args.models.split(","):
    for precision in args.precisions.split(","):
      per = {"jaxlm": [], "torch": []}
      for rnd in range(args.rounds):
        for fw in ("jaxlm", "torch"):
          r = run_one(args.python, fw, model, precision, args, env)
          r["round"] = rnd
          runs.append(r)
          per[fw].append(r)
          print(f"# round {rnd} {model} {precision} {fw}: "
                + (f"{r['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in r
                   else f"FAILED rc={r['error']}"), file=sys.stderr, flush=True)
      j, t = med(per["jaxlm"], "tokens_per_s"), med(per["torch"], "tokens_per_s")
      rows.append({"model": model, "precision": precision, "jaxlm_tokens_per_s": j,
                   "torch_tokens_per_s": t, "ratio": (j / t) if j and t else None,
                   "jaxlm_peak_rss_mib": med(per["jaxlm"], "peak_rss_mib"),
                   "torch_peak_rss_mib": med(per["torch"], "peak_rss_mib"),
                   "jaxlm_compile_s": med(per["jaxlm"], "compile_s"),
                   "jaxlm_runs": [r.get("tokens_per_s") for r in per["jaxlm"]],
                   "torch_runs": [r.get("tokens_per_s") for r in per["torch"]]})

  versions = {k: next((r[k] for r in runs if k in r), None)
              for k in ("jax", "torch", "transformers", "attn_implementation")}
  out = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(),
         "versions": versions, "env": bench_env, "rounds": args.rounds,
         "steps": args.steps, "warmup": args.warmup, "summary": rows, "runs": runs}
  path = args.out or os.path.join(HERE, "results", f"cpu-{time.strftime('%Y%m%d')}.json")
  write_json(json.dumps(out, indent=2), path, out_name=os.path.basename(path))

  f = lambda x, d=0: "—" if x is None else f"{x:,.{d}f}"  # noqa: E731
  print(f"Machine: {out['machine']['cpu']}, {out['machine']['cpu_count']} cores; "
        f"{args.rounds} round(s) x {args.steps} steps; torch attn {args.torch_attn}\n")
  print("| model | precision | jaxlm tok/s (median) | torch tok/s (median) | ratio jaxlm/torch "
        "| peak RSS jaxlm MiB | peak RSS torch MiB |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['precision']} | {f(r['jaxlm_tokens_per_s'])} "
          f"| {f(r['torch_tokens_per_s'])} | {f(r['ratio'], 2)} "
          f"| {f(r['jaxlm_peak_rss_mib'])} | {f(r['torch_peak_rss_mib'])} |")
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
