"""Attention throughput: our Pallas flash attention vs cuDNN vs the XLA reference.

For each sequence length (1k..16k), head dim (64, 128) and causal / non-causal, in bf16
with GQA 8:1 (32 query heads, 4 KV heads) and a batch that keeps ~8k tokens per step,
times the forward and forward+backward (vjp) of

  pallas: jaxlm.kernels.flash_attention (Triton on GPU, Mosaic on TPU)
  cudnn:  jax.nn.dot_product_attention(..., implementation="cudnn") (GPU only)
  xla:    jaxlm.layers.attention.dot_product_attention (materializes [B, N, T, S] f32 logits;
          skipped when those would exceed --xla-max-logits-gib)

FLOPs are counted the standard way: 4 * B * Hq * Tq * Tk * D for the forward (the two
matmuls), halved when causal; the backward is 2.5x the forward, so fwd+bwd = 3.5x.
Times are medians of --reps runs after one compile-and-warm-up call, each ended with
block_until_ready. Configurations past --budget-s are recorded as skipped, so the whole
run stays under 4 minutes on one H100. Each pallas forward is also checked against the
XLA (or cuDNN) output ("max_abs_err_vs").

  python benchmarks/attention.py            # accelerator sweep
  python benchmarks/attention.py --quick    # CPU smoke test: tiny shapes, interpret mode

Prints JSON; writes it to $OUT/attention_<backend>.json when OUT is set.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from common import write_json  # benchmarks/common.py
from jaxlm.kernels import flash_attention
from jaxlm.layers.attention import causal_mask, dot_product_attention

Q_HEADS, KV_HEADS = 32, 4


def attention_fn(impl: str, causal: bool, T: int):
  """(q, k, v) -> out for one implementation; raises if unavailable here."""
  if impl == "pallas":
    return functools.partial(flash_attention, causal=causal)
  if impl == "cudnn":
    if jax.default_backend() != "gpu":
      raise LookupError(f"cuDNN attention needs a GPU (backend: {jax.default_backend()})")
    return functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                             implementation="cudnn")
  mask = causal_mask(T, T) if causal else None
  # bf16 matmul inputs, f32 softmax, output cast back: what the Attention layer computes.
  return lambda q, k, v: dot_product_attention(q, k, v, mask, dtype=q.dtype).astype(q.dtype)


def sig(x: float) -> float:
  return float(f"{x:.4g}")


def median_seconds(fn, args, reps: int) -> tuple[float, float]:
  """(first call incl. compile, median of `reps` further calls), in seconds."""
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return first, statistics.median(times)


def bench_config(T: int, D: int, causal: bool, batch: int, args) -> dict:
  dtype = jnp.bfloat16
  kq, kk, kv, kd = jax.random.split(jax.random.key(T + D + causal), 4)
  q = jax.random.normal(kq, (batch, T, Q_HEADS, D), dtype)
  k = jax.random.normal(kk, (batch, T, KV_HEADS, D), dtype)
  v = jax.random.normal(kv, (batch, T, KV_HEADS, D), dtype)
  do = jax.random.normal(kd, (batch, T, Q_HEADS, D), dtype)
  flop_fwd = 4 * batch * Q_HEADS * T * T * D / (2 if causal else 1)
  row = {"seq": T, "head_dim": D, "causal": causal, "batch": batch, "q_heads": Q_HEADS,
         "kv_heads": KV_HEADS, "dtype": "bfloat16", "gflop_fwd": round(flop_fwd / 1e9, 2),
         "gflop_fwd_bwd": round(3.5 * flop_fwd / 1e9, 2), "results": {}}
  outs = {}
  for impl in args.impls:
    logits_gib = batch * Q_HEADS * T * T * 4 / 2**30
    if impl == "xla" and logits_gib > args.xla_max_logits_gib:
      row["results"][impl] = {"skipped": f"f32 logits would take {logits_gib:.1f} GiB "
                                         f"(> --xla-max-logits-gib {args.xla_max_logits_gib})"}
      continue
    try:
      attn = attention_fn(impl, causal, T)
    except LookupError as e:
      row["results"][impl] = {"skipped": str(e)}
      continue
    fwd = jax.jit(attn)
    fwd_bwd = jax.jit(lambda q, k, v, do, attn=attn: jax.vjp(attn, q, k, v)[1](do))
    try:
      c_f, t_f = median_seconds(fwd, (q, k, v), args.reps)
      outs[impl] = fwd(q, k, v)
      c_fb, t_fb = median_seconds(fwd_bwd, (q, k, v, do), args.reps)
    except Exception as e:  # noqa: BLE001 (unsupported config / OOM: record and go on)
      row["results"][impl] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
      continue
    row["results"][impl] = {
        "fwd_ms": sig(t_f * 1e3), "fwd_tflops": sig(flop_fwd / t_f / 1e12),
        "fwd_bwd_ms": sig(t_fb * 1e3), "fwd_bwd_tflops": sig(3.5 * flop_fwd / t_fb / 1e12),
        "first_call_s": round(c_f + c_fb, 2)}
  if "pallas" in outs:
    for ref in ("xla", "cudnn"):
      if ref in outs:
        err = jnp.max(jnp.abs(outs["pallas"].astype(jnp.float32) - outs[ref].astype(jnp.float32)))
        row["results"]["pallas"]["max_abs_err_vs"] = {ref: float(err)}
        break
  return row


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true",
                  help="CPU smoke test: seq 128/256, head dim 64, interpret mode, 2 reps")
  ap.add_argument("--seqs", default="1024,2048,4096,8192,16384")
  ap.add_argument("--head-dims", default="64,128")
  ap.add_argument("--impls", default="pallas,cudnn,xla")
  ap.add_argument("--tokens", type=int, default=8192, help="batch = max(1, tokens // seq)")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--xla-max-logits-gib", type=float, default=12.0)
  ap.add_argument("--budget-s", type=float, default=180.0,
                  help="start no new configuration after this many seconds")
  args = ap.parse_args(argv)
  if args.quick:
    args.seqs, args.head_dims, args.tokens, args.reps = "128,256", "64", 256, 2
  args.impls = args.impls.split(",")

  t0 = time.perf_counter()
  backend = jax.default_backend()
  report = {
      "benchmark": "attention fwd and fwd+bwd TFLOP/s: pallas (jaxlm.kernels) vs cudnn vs xla",
      "flops": "fwd 4*B*Hq*T*T*D (halved if causal); fwd+bwd 3.5x fwd",
      "quick": args.quick, "reps": args.reps, "jax": jax.__version__, "backend": backend,
      "device": str(jax.devices()[0].device_kind), "machine": platform.machine(),
      "pallas_mode": "interpret" if backend == "cpu" else "compiled",
      "configs": [],
  }
  for T in map(int, args.seqs.split(",")):
    for D in map(int, args.head_dims.split(",")):
      for causal in (False, True):
        if time.perf_counter() - t0 > args.budget_s:
          report["configs"].append({"seq": T, "head_dim": D, "causal": causal,
                                    "skipped": f"time budget {args.budget_s}s spent"})
          continue
        row = bench_config(T, D, causal, max(1, args.tokens // T), args)
        report["configs"].append(row)
        summary = {k: r.get("fwd_bwd_tflops", r.get("skipped", r.get("error", ""))[:40])
                   for k, r in row["results"].items()}
        print(f"T={T} D={D} causal={causal}: fwd+bwd TFLOP/s {summary}", file=sys.stderr,
              flush=True)
  report["seconds"] = round(time.perf_counter() - t0, 1)
  text = json.dumps(report, indent=2)
  print(text)
  write_json(text, out_name=f"attention_{backend}.json")
  return report


if __name__ == "__main__":
  main()
