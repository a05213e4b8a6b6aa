"""Training throughput and MFU of a ~1B Llama-shaped decoder on one accelerator.

The model is configs/llama_1b.py (16 layers, d 2048, GQA 32:8, SwiGLU 8192, tied head) at
a 32k vocabulary, trained at seq 2048 in bf16 (f32 master weights and Adam moments) with
jaxlm's own train step (jaxlm.train.steps.make_train_step: the fused vocabulary
cross-entropy, AdamW, donated buffers). For each attention backend in --impls (default:
cudnn and our pallas kernel on GPU) it compiles the step, runs --warmup steps, then times
--steps steps and records the median step time, tokens/s and MFU:

  MFU = training FLOPs per token (jaxlm.analysis, MaxText's accounting, causal halving)
        * tokens/s / peak bf16 FLOP/s of the device (jaxlm.analysis.DEVICES)

A backend that fails (compile error, out of memory) is recorded with its error, and the
run goes on; --budget-s stops starting new backends so the whole run stays under 5 minutes.
Installs nothing; writes JSON to $OUT/gpu_train.json when OUT is set.

  python benchmarks/gpu_train.py                     # the accelerator run
  python benchmarks/gpu_train.py --tiny --impls xla  # CPU smoke test (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import causal_batch, write_json  # noqa: E402  (benchmarks/common.py)


def build(impl: str, *, tiny: bool, seq: int, vocab: int, remat: str):
  from flax import nnx
  from configs import llama_1b
  from jaxlm import experiment
  from jaxlm.models import auto
  from jaxlm.train.optim import make_optimizer
  cfg = llama_1b.get_config("tiny" if tiny else None)
  cfg.train.precision = "bf16"
  cfg.train.update(warmup_steps=0, decay="constant")
  mc = experiment.model_config(cfg).replace(
      vocab_size=vocab, pad_token_id=0, eos_token_id=1, max_position_embeddings=max(seq, 128))
  rt = experiment.runtime(cfg).replace(attention_impl=impl, remat=remat)
  model = auto.build_model(mc, runtime=rt, seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  tx, _ = make_optimizer(cfg.train)
  return mc, graphdef, params, tx


def run_impl(impl: str, a) -> dict:
  from jaxlm import analysis, tasks
  from jaxlm.train.steps import make_train_step
  t0 = time.perf_counter()
  mc, graphdef, params, tx = build(impl, tiny=a.tiny, seq=a.seq, vocab=a.vocab, remat=a.remat)
  opt_state = jax.jit(tx.init)(params)
  step = make_train_step(graphdef, tx, tasks.get("causal"), seed=0, dropout=False)
  batch = jax.device_put(causal_batch(np.random.default_rng(0), a.batch, a.seq, a.vocab))
  params, opt_state, m = step(params, opt_state, batch, 0)
  loss0 = float(m["loss"])
  compile_s = time.perf_counter() - t0
  for s in range(1, a.warmup):
    params, opt_state, m = step(params, opt_state, batch, s)
  jax.block_until_ready(m)
  times = []
  for s in range(a.steps):
    t = time.perf_counter()
    params, opt_state, m = step(params, opt_state, batch, a.warmup + s)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  med = statistics.median(times)
  tokens_per_s = a.batch * a.seq / med
  flops = analysis.training_flops_per_token(mc, a.seq)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  peak = analysis.job_peak_flops("bfloat16")
  out = {"impl": impl, "params": int(n_params), "batch": a.batch, "seq_len": a.seq,
         "tokens_per_s": tokens_per_s,
         "step_time_s": {"min": min(times), "median": med, "max": max(times)},
         "compile_and_first_step_s": compile_s, "loss_first": loss0,
         "loss_last": float(m["loss"]), "flops_per_token": flops["total"],
         "model_tflops_per_s": flops["total"] * tokens_per_s / 1e12}
  if peak is not None:
    out.update(peak_flops=peak[0], peak_source=peak[1],
               mfu=flops["total"] * tokens_per_s / peak[0])
  try:
    stats = jax.devices()[0].memory_stats() or {}
    out["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
  except Exception:  # noqa: BLE001  (CPU has no memory stats)
    pass
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--impls", default=None,
                  help="comma-separated attention backends (default: cudnn,pallas on GPU, "
                       "pallas,xla on TPU, xla on CPU)")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=2048)
  ap.add_argument("--vocab", type=int, default=32768)
  ap.add_argument("--remat", default="dots", choices=("none", "dots", "full"))
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--budget-s", type=float, default=200.0,
                  help="start no new backend after this many seconds")
  ap.add_argument("--tiny", action="store_true", help="configs/llama_1b.py:tiny (smoke test)")
  ap.add_argument("--out", default=None, help="also write the JSON here")
  a = ap.parse_args()
  if a.tiny:
    a.batch, a.seq, a.vocab = min(a.batch, 2), min(a.seq, 64), min(a.vocab, 512)
  backend = jax.default_backend()
  default = {"gpu": "cudnn,pallas", "tpu": "pallas,xla"}.get(backend, "xla")
  impls = (a.impls or default).split(",")
  t_start = time.perf_counter()
  results = []
  for impl in impls:
    if time.perf_counter() - t_start > a.budget_s:
      results.append({"impl": impl, "skipped": f"past --budget-s {a.budget_s}"})
      continue
    try:
      results.append(run_impl(impl, a))
    except Exception as e:  # noqa: BLE001  (record and go on: OOM, unsupported backend)
      results.append({"impl": impl, "error": f"{type(e).__name__}: {str(e)[:500]}"})
    print(json.dumps(results[-1]), flush=True)
  ok = [r for r in results if "tokens_per_s" in r]
  best = max(ok, key=lambda r: r["tokens_per_s"]) if ok else None
  doc = {"benchmark": "gpu_train", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
         "device": jax.devices()[0].device_kind, "backend": backend,
         "device_count": jax.device_count(), "jax": jax.__version__,
         "python": platform.python_version(), "model": "llama_1b" + (":tiny" if a.tiny else ""),
         "precision": "bf16", "remat": a.remat, "results": results,
         "best": None if best is None else {k: best.get(k) for k in
                                            ("impl", "tokens_per_s", "mfu")},
         "wall_s": time.perf_counter() - t_start}
  text = json.dumps(doc, indent=1)
  write_json(text, a.out, out_name="gpu_train.json")
  print(text)


if __name__ == "__main__":
  main()
