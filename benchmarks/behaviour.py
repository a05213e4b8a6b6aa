"""Behaviour fingerprint of the training CLI: per-step losses, validation metrics, report
samples and a hash of the exported weights, for a fixed set of configs run for 20 steps.

Refactors that must not change behaviour (issue 12, "the house") are checked by running
this before and after and comparing the two JSON files; every value must match exactly.

  python benchmarks/behaviour.py --out benchmarks/results/behaviour-before.json
  python benchmarks/behaviour.py --out benchmarks/results/behaviour-after.json
  python benchmarks/behaviour.py --compare benchmarks/results/behaviour-{before,after}.json

Committed: behaviour-before.json (before the refactor), behaviour-after.json (after it:
identical), behaviour-after-issue19.json (after the NaN guard of the reliability issue: the
guard's select changes XLA:CPU's fusion of the optimizer update, so values differ in float
rounding only, at most 1.7e-6 relative, and the exported weights in their last bits).

Timing fields (tokens/s, step times, MFU, wall seconds) are dropped; everything else in
metrics.jsonl and report.json is kept. Each run uses a fresh workdir in a temp folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("default.py:tiny", "bert_tiny.py:tiny", "gpt2_small.py:tiny", "bloom_tiny.py",
           "t5_small.py:tiny", "mixtral_tiny.py")
STEPS = 20
TIMING = ("tokens_per_s", "step_time_s", "mfu", "wall_seconds", "train_seconds",
          "prepare_seconds", "seconds")


def _weights_sha(model_dir: str) -> str:
  """SHA-256 over the exported tensors (name, dtype, shape, bytes), in name order."""
  from safetensors.numpy import load_file
  h = hashlib.sha256()
  for name in sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors")):
    tensors = load_file(os.path.join(model_dir, name))
    for key in sorted(tensors):
      t = tensors[key]
      h.update(f"{key}|{t.dtype}|{t.shape}".encode())
      h.update(t.tobytes())
  return h.hexdigest()


def _untimed(x):
  """`x` without its timing fields, at any depth."""
  if isinstance(x, dict):
    return {k: _untimed(v) for k, v in x.items() if k not in TIMING}
  return [_untimed(v) for v in x] if isinstance(x, list) else x


def run_one(config: str, workdir: str) -> dict:
  cmd = [sys.executable, "-m", "jaxlm.main", f"--config={os.path.join(ROOT, 'configs', config)}",
         f"--workdir={workdir}", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
         "--config.train.eval_every=10", "--config.checkpoint.every=10"]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": ROOT})
  if proc.returncode:
    return {"error": proc.stderr.strip().splitlines()[-1:], "returncode": proc.returncode}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [_untimed(json.loads(line)) for line in f if line.strip()]
  with open(os.path.join(workdir, "report.json"), encoding="utf-8") as f:
    report = _untimed(json.load(f))
  return {"metrics": rows, "report": report,
          "weights_sha256": _weights_sha(os.path.join(workdir, "model")),
          "seconds": round(time.perf_counter() - t0, 1)}


def _cpu() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      text = f.read()
  except OSError:
    return platform.processor()
  name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
               if ln.startswith("model name")), "?")
  return f"{name} ({'AMX' if 'amx_bf16' in text else 'no AMX'}, {os.cpu_count()} cores)"


def _git_head() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                          capture_output=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "?"


def _diff(a, b, path="") -> list[str]:
  """Paths where two JSON values differ, with the values (floats compared exactly)."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      if k not in a or k not in b:
        out.append(f"{path}/{k}: only in {'after' if k in b else 'before'}")
      else:
        out += _diff(a[k], b[k], f"{path}/{k}")
    return out
  if isinstance(a, list) and isinstance(b, list):
    if len(a) != len(b):
      return [f"{path}: {len(a)} vs {len(b)} items"]
    return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
  return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def compare(before: str, after: str) -> int:
  with open(before, encoding="utf-8") as f:
    a = json.load(f)
  with open(after, encoding="utf-8") as f:
    b = json.load(f)
  bad = 0
  for config in CONFIGS:
    diffs = _diff(_untimed(a["runs"][config]), _untimed(b["runs"][config]))
    n_rows = len(a["runs"][config].get("metrics", []))
    print(f"{config:20s} {'identical' if not diffs else f'{len(diffs)} differences'} "
          f"({n_rows} metric rows, weights {a['runs'][config].get('weights_sha256', '?')[:12]})")
    for d in diffs[:10]:
      print("   ", d)
    bad += bool(diffs)
  return 1 if bad else 0


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", help="write the fingerprint JSON here")
  ap.add_argument("--configs", default=",".join(CONFIGS))
  ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
  a = ap.parse_args()
  if a.compare:
    return compare(*a.compare)
  doc = {"benchmark": "behaviour", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
         "git": _git_head(), "cpu": _cpu(), "steps": STEPS, "runs": {}}
  with tempfile.TemporaryDirectory() as tmp:
    for config in a.configs.split(","):
      doc["runs"][config] = run_one(config, os.path.join(tmp, config.replace(":", "_")))
      print(f"{config}: {doc['runs'][config].get('seconds', doc['runs'][config])}",
            file=sys.stderr, flush=True)
  text = json.dumps(doc, indent=1)
  if a.out:
    with open(a.out, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  else:
    print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
