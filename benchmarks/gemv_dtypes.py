"""One-row matmuls (a batch-1 decode step's shape) by weight dtype on XLA:CPU: x [1, K] @
W [K, N] with W in f32, bf16, int8 (+ per-column scale) and int4, written every way a
weight-only quantized layer could run it. Prints JSON with medians (microseconds) and
each form's time relative to the f32 matmul.

  python benchmarks/gemv_dtypes.py [--k 768 --n 12288 --reps 30]

This is the evidence for docs/performance.md#one-row-matmuls-by-dtype: weight-only
quantization cannot speed up batch-1 decoding here while XLA:CPU runs every non-f32
one-row matmul off its fast path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compress import cpu_name  # noqa: E402


def forms(K: int, N: int):
  x = jnp.ones((1, K), jnp.float32)
  w32 = jax.random.normal(jax.random.key(0), (K, N), jnp.float32)
  w8 = jnp.clip(jnp.round(w32 * 40), -127, 127).astype(jnp.int8)
  w4 = jnp.clip(jnp.round(w32 * 4), -8, 7).astype(jnp.int4)
  s = jnp.full((N,), 1 / 40, jnp.float32)
  dot = lambda a, b, t=jnp.float32: jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                                                         preferred_element_type=t)

  def act_int8(x):
    sx = jnp.max(jnp.abs(x), -1, keepdims=True) / 127
    return jnp.round(x / sx).astype(jnp.int8), sx

  def int8_int8(x, w, s):
    xq, sx = act_int8(x)
    return dot(xq, w, jnp.int32).astype(jnp.float32) * sx * s

  def int8_blocks(x, w, s, bn=256):  # dequantize 256 columns at a time inside a scan
    wb = w.reshape(K, N // bn, bn).transpose(1, 0, 2)
    _, y = jax.lax.scan(lambda c, a: (c, dot(x, a[0].astype(jnp.float32)) * a[1]), None,
                        (wb, s.reshape(N // bn, bn)))
    return y.transpose(1, 0, 2).reshape(1, N)

  return {
      "f32": (lambda x, w: dot(x, w), (x, w32)),
      "bf16_weights_bf16_dot": (lambda x, w: dot(x.astype(jnp.bfloat16), w),
                                (x, w32.astype(jnp.bfloat16))),
      "int8_weights_f32_dequant_dot": (lambda x, w, s: dot(x, w.astype(jnp.float32)) * s,
                                       (x, w8, s)),
      "int8_weights_mixed_dot": (lambda x, w, s: dot(x, w) * s, (x, w8, s)),
      "int8_weights_int8_activations": (int8_int8, (x, w8, s)),
      "int8_weights_blockwise_dequant": (int8_blocks, (x, w8, s)),
      "int4_weights_int8_activations": (lambda x, w, s: int8_int8(x, w.astype(jnp.int8), s),
                                        (x, w4, s)),
  }


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--k", type=int, default=768)
  ap.add_argument("--n", type=int, default=12288)
  ap.add_argument("--reps", type=int, default=30)
  a = ap.parse_args()
  out = {}
  for name, (fn, args) in forms(a.k, a.n).items():
    fn = jax.jit(fn)
    fn(*args).block_until_ready()
    ts = []
    for _ in range(a.reps):
      t = time.perf_counter()
      fn(*args).block_until_ready()
      ts.append(time.perf_counter() - t)
    out[name] = round(1e6 * statistics.median(ts), 1)
  print(json.dumps({"cpu": cpu_name(), "jax": jax.__version__, "shape": [1, a.k, a.n],
                    "median_us": out,
                    "vs_f32": {k: round(v / out["f32"], 2) for k, v in out.items()}}, indent=1))


if __name__ == "__main__":
  main()
