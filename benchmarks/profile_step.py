"""Where a jaxlm train step spends its time on this CPU: a jax.profiler trace of a few
steps of benchmarks/train_throughput.py's models, summed by XLA operation kind.

Each row is one kind of compiled operation (the name XLA gives its fusions, with the
number dropped: `ynn_fusion` = matmuls and what YNNPACK fused into them, `*_fusion` =
elementwise loops, `cond` = jaxlm.layers.linear.materialize) with its total duration per
step and its share. The durations are per operation, and XLA:CPU runs independent
operations side by side on the two cores, so the shares sum to more than the step time.
The `matmul_floor_s` line is the step's matmul FLOPs over this CPU's measured matmul peak:
the time no schedule can beat.

  python benchmarks/profile_step.py --model gpt --precision fp32 [--steps 3] [--out F]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

import train_throughput as tt  # noqa: E402  (benchmarks/train_throughput.py)
from common import write_json  # noqa: E402

_RUNTIME = re.compile(r"^\$|Thunk|Pjit|Slinky|PjRt|ParseArguments|^end: ")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", choices=("bert", "gpt", "llama"), required=True)
  ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--top", type=int, default=15)
  ap.add_argument("--out", default=None)
  a = ap.parse_args()
  from jaxlm import analysis, tasks
  B, T = tt.DEFAULT_SHAPE[a.model]
  step, params, opt_state, batch, mc, objective = tt.jaxlm_train_state(a.model, a.precision,
                                                                       B, T)
  times = []
  for s in range(3 + a.steps):
    t0 = time.perf_counter()
    params, opt_state, m = step(params, opt_state, batch, s)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  trace_dir = tempfile.mkdtemp(prefix="jaxlm_profile_")
  try:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for s in range(a.steps):
        params, opt_state, m = step(params, opt_state, batch, s)
        jax.block_until_ready(m)
    path = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
      events = json.load(f)
  finally:
    shutil.rmtree(trace_dir, ignore_errors=True)
  events = events["traceEvents"] if isinstance(events, dict) else events
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not _RUNTIME.search(e["name"]):
      kind = re.sub(r"\.\d+(\.clone)?$", "", e["name"])
      total[kind] += e["dur"] / 1e6 / a.steps
      count[kind] += 1
  step_s = statistics.median(times[3:])
  data = types.SimpleNamespace(max_seq_len=T, mask_prob=0.15)
  flops = analysis.training_flops_per_token(
      mc, T, tasks.get(objective).vocab_positions_fraction(data))
  peak = analysis.measure_cpu()["peak_flops" if a.precision == "bf16" else "peak_flops_f32"]
  rows = [{"op": k, "s_per_step": v, "share_of_step": v / step_s,
           "count_per_step": count[k] // a.steps} for k, v in total.most_common(a.top)]
  from behaviour import _cpu  # noqa: PLC0415 (benchmarks/behaviour.py)
  doc = {"benchmark": "profile_step", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": _cpu(),
         "model": a.model, "precision": a.precision, "batch": B, "seq_len": T,
         "step_s": step_s, "tokens_per_s": B * T / step_s,
         "op_seconds_per_step": sum(total.values()),
         "matmul_flops_per_step": flops["total"] * B * T, "cpu_matmul_peak_flops": peak,
         "matmul_floor_s": flops["total"] * B * T / peak, "ops": rows}
  text = json.dumps(doc, indent=1)
  write_json(text, a.out, out_name=f"profile_{a.model}_{a.precision}.json")
  print(text)


if __name__ == "__main__":
  main()
