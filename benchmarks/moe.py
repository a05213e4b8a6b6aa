"""Times one sparse MoE layer (jaxlm.layers.moe.MoE) against a dense SwiGLU MLP with the same
ACTIVE parameters (F_dense = k * F), forward + backward, on CPU.

Default shapes: E=8 experts, top-2, D=512, F=1024, 4096 tokens; bf16 (f32 accumulation)
and fp32. Each measurement is one jitted value-and-grad of sum(y^2) with respect to the
parameters and the input, the train-step pattern (nnx.merge inside jax.jit). Layers
alternate within every repetition, so machine noise hits both alike; medians are reported
with the MoE/dense ratio (goal: <= 1.5). Prints JSON; writes it to $OUT/moe_cpu.json when
OUT is set and to benchmarks/results/moe_cpu.json with --save.

  python benchmarks/moe.py [--reps 7] [--save] [--ragged-dot]

--ragged-dot also times a dropless variant built on jax.lax.ragged_dot (once, slowly: on
CPU it lowers to a masked dense matmul per expert).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

# glibc malloc settings that remove most page faults (docs/performance.md#memory-and-allocator); set
# before JAX starts, for both sides alike.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
              "MALLOC_TRIM_THRESHOLD_": "8000000000", "MALLOC_TOP_PAD_": "268435456"}
if __name__ == "__main__" and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
  os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC_ENV})

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from common import write_json  # noqa: E402  (benchmarks/common.py)
from jaxlm.layers.mlp import MLP  # noqa: E402
from jaxlm.layers.moe import MoE, route  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def ragged_dot_moe(moe: MoE, x_ND, dtype):
  """Dropless MoE with jax.lax.ragged_dot over expert-sorted slots (for comparison)."""
  K = moe.top_k
  w_NK, idx_NK = route(moe.router(x_ND.astype(jnp.float32)), K)
  order_S = jnp.argsort(idx_NK.reshape(-1), stable=True)
  tok_S = order_S // K
  sizes_E = jnp.bincount(idx_NK.reshape(-1), length=moe.num_experts).astype(jnp.int32)
  x_SD = x_ND.astype(dtype)[tok_S]

  def rd(a, w):
    return jax.lax.ragged_dot(a.astype(dtype), w[...].astype(dtype), sizes_E,
                              preferred_element_type=jnp.float32)

  h_SF = moe.act(rd(x_SD, moe.gate)) * rd(x_SD, moe.up)
  y_SD = rd(h_SF, moe.down) * w_NK.reshape(-1)[order_S][:, None]
  return jnp.zeros(x_ND.shape, jnp.float32).at[tok_S].add(y_SD)


def step_fn(module: nnx.Module, call):
  """jit(value_and_grad) of sum(call(module, x)^2) w.r.t. params and x: a train step."""
  graphdef, params = nnx.split(module, nnx.Param)

  @jax.jit
  def step(params, x):
    def loss(params, x):
      y = call(nnx.merge(graphdef, params), x)
      return jnp.sum(jnp.square(y.astype(jnp.float32)))
    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

  return step, params


def timed(step, params, x) -> tuple[float, float]:
  """(wall seconds, process CPU seconds) of one step."""
  w, c = time.perf_counter(), time.process_time()
  jax.block_until_ready(step(params, x))
  return time.perf_counter() - w, time.process_time() - c


def bench_dtype(dtype, args) -> dict:
  D, F, E, K, N = args.hidden, args.ffn, args.experts, args.top_k, args.tokens
  x = jax.random.normal(jax.random.key(0), (1, N, D), jnp.float32)
  moe = MoE(D, F, E, K, activation="silu", gated=True, use_bias=False, dtype=dtype,
            rngs=nnx.Rngs(0))
  dense = MLP(D, K * F, activation="silu", gated=True, use_bias=False, dtype=dtype,
              rngs=nnx.Rngs(1))
  _, idx_NK = route(moe.router(x[0]), K)
  load_E = jnp.bincount(idx_NK.reshape(-1), length=E)
  steps = {
      "dense": step_fn(dense, lambda m, x: m(x)),
      "moe": step_fn(moe, lambda m, x: m(x)),
  }
  if args.capacity:
    cap = MoE(D, F, E, K, activation="silu", gated=True, use_bias=False, dtype=dtype,
              capacity_factor=args.capacity, rngs=nnx.Rngs(0))
    steps["moe_capacity"] = step_fn(cap, lambda m, x: m(x))
  compile_s = {}
  for name, (step, params) in steps.items():
    t = time.perf_counter()
    jax.block_until_ready(step(params, x))
    compile_s[name] = round(time.perf_counter() - t, 2)
  runs = {name: [] for name in steps}
  for _ in range(args.reps):  # alternate, so noise from other processes hits both
    for name, (step, params) in steps.items():
      runs[name].append(timed(step, params, x))
  med = {name: statistics.median(r[0] for r in rs) for name, rs in runs.items()}
  cpu = {name: statistics.median(r[1] for r in rs) for name, rs in runs.items()}
  out = {
      "median_ms": {k: round(v * 1e3, 1) for k, v in med.items()},
      "median_cpu_ms": {k: round(v * 1e3, 1) for k, v in cpu.items()},
      "ratio_moe_over_dense": round(med["moe"] / med["dense"], 3),
      "ratio_cpu_time": round(cpu["moe"] / cpu["dense"], 3),
      "runs_ms": {k: [round(r[0] * 1e3, 1) for r in rs] for k, rs in runs.items()},
      "compile_s": compile_s,
      # routing of the (random) router: slots per expert, max over mean
      "expert_load_max_over_mean": round(float(load_E.max() / load_E.mean()), 3),
  }
  if args.capacity:
    out["ratio_capacity_over_dense"] = round(med["moe_capacity"] / med["dense"], 3)
  if args.ragged_dot:
    step, params = step_fn(moe, lambda m, x: ragged_dot_moe(m, x[0], dtype))
    jax.block_until_ready(step(params, x))
    ts = [timed(step, params, x)[0] for _ in range(2)]
    out["median_ms"]["moe_ragged_dot"] = round(statistics.median(ts) * 1e3, 1)
    out["ratio_ragged_dot_over_dense"] = round(statistics.median(ts) / med["dense"], 3)
  return out


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--tokens", type=int, default=4096)
  ap.add_argument("--hidden", type=int, default=512)
  ap.add_argument("--ffn", type=int, default=1024, help="per-expert intermediate size F")
  ap.add_argument("--experts", type=int, default=8)
  ap.add_argument("--top-k", type=int, default=2)
  ap.add_argument("--capacity", type=float, default=1.25,
                  help="also time capacity mode with this factor (0: skip)")
  ap.add_argument("--dtypes", default="bfloat16,float32")
  ap.add_argument("--ragged-dot", action="store_true")
  ap.add_argument("--save", action="store_true", help="write benchmarks/results/moe_cpu.json")
  args = ap.parse_args(argv)

  from behaviour import _cpu  # noqa: PLC0415 (benchmarks/behaviour.py: the CPU's name)
  t0 = time.perf_counter()
  report = {
      "benchmark": "MoE layer vs dense SwiGLU MLP with the same active parameters, fwd+bwd",
      "shapes": {"tokens": args.tokens, "hidden": args.hidden, "ffn_per_expert": args.ffn,
                 "experts": args.experts, "top_k": args.top_k,
                 "ffn_dense": args.top_k * args.ffn},
      "dispatch": "moe = dropless (the default): token slots sorted by expert into 128-row "
                  "blocks padded per expert; a lax.while_loop runs one 2-D matmul per chunk "
                  "of up to 8 blocks of one expert (jaxlm.layers.moe.ragged_matmul). "
                  "moe_capacity: [E, C, D] batched matmul, C = ceil(factor*k*N/E) rows per "
                  "expert (so factor 1.25 computes 25% more rows than dropless).",
      "capacity_factor": args.capacity,
      "goal": "moe <= 1.5 x dense",
      "reps": args.reps,
      "jax": jax.__version__, "backend": jax.default_backend(),
      "cpu_count": os.cpu_count(), "machine": platform.machine(), "cpu": _cpu(),
      "results": {},
  }
  for name in args.dtypes.split(","):
    report["results"][name] = bench_dtype(jnp.dtype(name), args)
    print(f"{name}: {report['results'][name]['median_ms']} ratio "
          f"{report['results'][name]['ratio_moe_over_dense']}", file=sys.stderr, flush=True)
  report["goal_met"] = all(r["ratio_moe_over_dense"] <= 1.5
                           for r in report["results"].values())
  report["seconds"] = round(time.perf_counter() - t0, 1)
  text = json.dumps(report, indent=2, sort_keys=True)
  print(text)
  write_json(text, os.path.join(HERE, "results", "moe_cpu.json") if args.save else None,
             out_name="moe_cpu.json")
  return report


if __name__ == "__main__":
  main()
