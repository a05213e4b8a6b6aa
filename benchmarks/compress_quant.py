"""Weight-only quantization (issue 15, part 1): bytes, quality and decode speed of
jaxlm.quantize in f32 (the reference), bf16, int8 and int4 (group 128; asymmetric, the
default, and symmetric).

  python benchmarks/compress_quant.py [--rounds 3] [--out FILE]   # ~20 min on 2 cores
  python benchmarks/compress_quant.py --quick                     # smoke run, ~2 min

Sections of the JSON document (stdout; progress on stderr):
  decoder    runs/compress_teacher (configs/gpt2_small.py:mini: 4 layers, d 128, vocab
             4096, tied head): parameter bytes by dtype and against f32, validation
             perplexity over the whole validation split from the logits of the quantized
             model (its inference path), decode tokens/s at batch 1.
  bert       runs/compress_quant_bert: the main job's BERT (configs/default.py) trained
             here for 1,000 of its 3,000 steps when missing (--config.train.steps=1000):
             bytes and validation MLM perplexity (the task's own loss, which reads the
             dequantized head).
  speed      a random GPT-2-small (124M, vocab 50257, tied head), where a decode step
             reads the weights rather than paying per-op overhead: decode and prefill
             tokens/s at batch 1 (prompt 32; decode = 63 steps from t(64 new) - t(1 new)),
             every mode in a fresh process, the modes alternated in each round; medians
             and ratios to f32.
  matmul     the matmuls behind the layout choice, x [1, 768] @ W [768, N] for N = 12288
             (an MLP) and 50257 (GPT-2's head), jitted, in a fresh process: f32, the naive
             convert-then-dot of int8 / bf16 weights, jaxlm's blocked formulation for each
             mode, and Google's Qwix PTQ (weight-only int8 / int4 on nnx.Linear) when
             `import qwix` works (not a jaxlm dependency: install it with
             `pip install --no-deps --target DIR qwix` and put DIR on PYTHONPATH). The
             naive form's time depends on the process's history (16 ms fresh, 2-5 ms after
             a model build, at N = 12288): it writes a whole f32 copy of W; the blocked
             form writes one [768, 128] block at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

TEACHER = os.path.join(ROOT, "runs", "compress_teacher")
BERT = os.path.join(ROOT, "runs", "compress_quant_bert")
BERT_STEPS = 1000
# name -> jaxlm.quantize arguments (None: the float32 reference)
MODES = {"f32": None, "bf16": {"mode": "bf16"}, "int8": {"mode": "int8"},
         "int4": {"mode": "int4", "group_size": 128},
         "int4_sym": {"mode": "int4", "group_size": 128, "symmetric": True}}
PROMPT, NEW = 32, 64
GPT2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 50257,
        "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True, "bos_token_id": 50256, "eos_token_id": 50256}
QUICK_GPT2 = {**GPT2, "n_embd": 256, "n_layer": 2, "n_head": 4, "vocab_size": 4096}


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def load(directory: str, mode: str):
  """The model in `directory` (f32 compute), quantized as MODES[mode] says."""
  import jaxlm
  model = jaxlm.from_pretrained(directory, dtype="float32")
  return model if MODES[mode] is None else jaxlm.quantize(model, **MODES[mode])


def _bytes(model) -> dict:
  from jaxlm.compress.quantize import param_bytes
  by = param_bytes(model)
  return {"bytes": sum(by.values()), "bytes_by_dtype": by}


# ---- quality ----------------------------------------------------------------------------
def decoder_quality(directory: str, data_dir: str, data_cfg, max_batches=None) -> dict:
  """Per mode: bytes and validation perplexity from the model's logits."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from jaxlm import tasks
  from jaxlm.data.corpus import load_corpus

  batches = list(tasks.get("causal").eval_batches(load_corpus(data_dir), "validation",
                                                  data_cfg, batch_size=32, seed=1,
                                                  max_batches=max_batches))

  def nll(state, b, graphdef):
    m = nnx.merge(graphdef, state)
    logits = m(b["input_ids"], b["attention_mask"], segment_ids=b["segment_ids"],
               position_ids=b["position_ids"]).logits
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), b["targets"][..., None], -1)
    w = b["loss_weights"]
    return -(lp[..., 0] * w).sum(), w.sum()

  nll = jax.jit(nll, static_argnums=2)
  out = {}
  for mode in MODES:
    model = load(directory, mode)
    graphdef, state = nnx.split(model)
    total = count = 0.0
    for b in batches:
      s, c = nll(state, {k: np.asarray(v) for k, v in b.items()}, graphdef)
      total, count = total + float(s), count + float(c)
    out[mode] = {**_bytes(model), "val_perplexity": round(float(np.exp(total / count)), 4),
                 "val_tokens": int(count)}
    log(f"decoder {mode}: {out[mode]}")
  return _relative(out, "val_perplexity")


def _relative(out: dict, metric: str) -> dict:
  ref = out["f32"]
  for row in out.values():
    row["f32_bytes_over_bytes"] = round(ref["bytes"] / row["bytes"], 3)
    row[f"{metric}_rise_pct"] = round(100 * (row[metric] / ref[metric] - 1), 3)
  return out


def ensure_bert(quick: bool) -> str | None:
  """runs/compress_quant_bert (trained here if missing; never in --quick)."""
  if os.path.exists(os.path.join(BERT, "report.json")):
    return BERT
  if quick:
    return None
  log(f"training {BERT} (configs/default.py, {BERT_STEPS} steps)")
  proc = subprocess.run([sys.executable, "-m", "jaxlm.main", "--config=configs/default.py",
                         f"--workdir={BERT}", f"--config.train.steps={BERT_STEPS}",
                         "--config.train.eval_every=500"], cwd=ROOT, capture_output=True,
                        text=True, check=False)
  if proc.returncode:
    raise SystemExit(f"{BERT}: exit {proc.returncode}: {proc.stderr[-2000:]}")
  return BERT


def bert_quality(workdir: str) -> dict:
  """Per mode: bytes and validation MLM perplexity (the task's fused loss)."""
  import jax
  import numpy as np
  from flax import nnx

  from configs import default
  from jaxlm import tasks
  from jaxlm.data.corpus import load_corpus

  cfg = default.get_config()
  task = tasks.get(cfg.train.objective)
  batches = list(task.eval_batches(load_corpus(os.path.join(workdir, "data")), "validation",
                                   cfg.data, batch_size=64, seed=1))
  stats = jax.jit(lambda state, b, g: task.stats(nnx.merge(g, state), b), static_argnums=2)
  out = {}
  for mode in MODES:
    model = load(os.path.join(workdir, "model"), mode)
    graphdef, state = nnx.split(model)
    sums: dict[str, float] = {}
    for b in batches:
      for k, v in jax.device_get(stats(state, b, graphdef)).items():
        sums[k] = sums.get(k, 0.0) + float(v)
    out[mode] = {**_bytes(model), "val_mlm_perplexity": round(float(np.exp(
        sums["mlm_loss_sum"] / sums["mlm_count"])), 4), "val_masked_tokens": int(
        sums["mlm_count"])}
    log(f"bert {mode}: {out[mode]}")
  return _relative(out, "val_mlm_perplexity")


# ---- speed ------------------------------------------------------------------------------
def worker(directory: str, mode: str, reps: int) -> dict:
  """Times greedy generation at batch 1 in this (fresh) process."""
  import numpy as np

  import jaxlm
  model = load(directory, mode)
  ids = np.random.default_rng(0).integers(100, model.config.vocab_size - 100, (1, PROMPT))
  new = min(NEW, model.config.max_position_embeddings - PROMPT)

  def timed(n):
    t = time.perf_counter()
    np.asarray(jaxlm.generate(model, ids, max_new_tokens=n, eos_token_id=-1))
    return time.perf_counter() - t

  timed(1), timed(new)  # compile
  t1 = statistics.median(timed(1) for _ in range(reps))
  tn = statistics.median(timed(new) for _ in range(reps))
  return {"t_prefill_s": t1, "t_total_s": tn, "new": new, **_bytes(model)}


def _spawn(directory: str, mode: str, reps: int) -> dict:
  """A worker in a fresh process (mode "matmul": matmul_profile, `reps` repetitions)."""
  path = os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
  proc = subprocess.run([sys.executable, __file__, "--worker", mode, "--dir", directory,
                         "--reps", str(reps)], capture_output=True, text=True, cwd=ROOT,
                        env={**os.environ, "PYTHONPATH": path}, check=False)
  if proc.returncode:
    return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def speed(directory: str, rounds: int, reps: int) -> dict:
  """Per mode: medians over `rounds` fresh processes, modes alternated in each round."""
  samples: dict[str, list] = {m: [] for m in MODES}
  for r in range(rounds):
    order = list(MODES) if r % 2 == 0 else list(MODES)[::-1]
    for mode in order:
      samples[mode].append(_spawn(directory, mode, reps))
      log(f"speed {os.path.basename(directory)} round {r} {mode}: {samples[mode][-1]}")
  out = {}
  for mode, rs in samples.items():
    ok = [x for x in rs if "error" not in x]
    if not ok:
      out[mode] = {"error": rs[0]["error"]}
      continue
    step = [(x["t_total_s"] - x["t_prefill_s"]) / (x["new"] - 1) for x in ok]
    out[mode] = {"decode_tok_s": round(1 / statistics.median(step), 2),
                 "decode_step_ms": round(1e3 * statistics.median(step), 3),
                 "decode_step_ms_runs": [round(1e3 * s, 3) for s in step],
                 "prefill_tok_s": round(PROMPT / statistics.median(x["t_prefill_s"]
                                                                   for x in ok), 1),
                 "bytes": ok[0]["bytes"]}
  ref = out.get("f32", {}).get("decode_tok_s")
  for row in out.values():
    if ref and "decode_tok_s" in row:
      row["decode_speedup_vs_f32"] = round(row["decode_tok_s"] / ref, 3)
      # The same round ran every mode back to back, under about the same machine load.
      row["decode_speedup_vs_f32_by_round"] = [
          round(f / m, 3) for f, m in zip(out["f32"]["decode_step_ms_runs"],
                                          row["decode_step_ms_runs"])]
  return out


def write_gpt2(directory: str, raw: dict) -> str:
  """A random GPT-2 in HF format (as benchmarks/decode.py writes it)."""
  import jaxlm
  from jaxlm import hf
  cfg = hf.family_of(raw["architectures"][0], "gpt2").config_from_hf(raw).replace(
      architectures=raw["architectures"])
  jaxlm.build_model(cfg, seed=0).save_pretrained(directory)
  return directory


def matmul_profile(K: int = 768, N: int = 12288, reps: int = 50) -> dict:
  """Milliseconds (median) of x [1, K] @ W [K, N] in each formulation (Qwix at 12288)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxlm.compress.quantize import QuantConfig, make_spec, qmatmul, quantize_weight

  def bench(f, *a):
    jax.block_until_ready(f(*a))
    ts = []
    for _ in range(reps):
      t = time.perf_counter()
      jax.block_until_ready(f(*a))
      ts.append(time.perf_counter() - t)
    return round(1e3 * statistics.median(ts), 3)

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, K)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((K, N)) * 0.02, jnp.float32)
  out = {"shape": [1, K, N], "f32_dot": bench(jax.jit(lambda x, w: x @ w), x, w)}
  w8 = jnp.clip(jnp.round(w / 0.001), -127, 127).astype(jnp.int8)
  out["int8_convert_then_dot"] = bench(jax.jit(lambda x, w: x @ w.astype(jnp.float32)), x, w8)
  out["bf16_convert_then_dot"] = bench(jax.jit(lambda x, w: x @ w.astype(jnp.float32)), x,
                                       w.astype(jnp.bfloat16))
  for name, q in MODES.items():
    if q is None:
      continue
    spec = make_spec(QuantConfig(**q), K, N, "w")
    arr = quantize_weight(w, spec)
    out[f"jaxlm_{name}"] = bench(jax.jit(lambda x, a, spec=spec: qmatmul(x, a, spec)), x, arr)
  if N == 12288:
    out["qwix"] = qwix_profile(x, K, N, bench)
  return out


def qwix_profile(x, K: int, N: int, bench) -> dict:
  """Qwix weight-only PTQ on an nnx.Linear, when qwix is importable."""
  try:
    import qwix
  except ImportError:
    return {"skipped": "qwix is not installed"}
  import jax
  from flax import nnx
  out = {"version": getattr(qwix, "__version__", "?")}
  base = nnx.Linear(K, N, use_bias=False, rngs=nnx.Rngs(0))

  def jitted(m):
    graphdef, state = nnx.split(m)
    f = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return lambda x: f(state, x)
  out["nnx_linear_f32"] = bench(jitted(base), x)
  for qtype, tile in (("int8", None), ("int4", 128)):
    rules = [qwix.QuantizationRule(module_path=".*", weight_qtype=qtype, tile_size=tile)]
    q = qwix.quantize_model(base, qwix.PtqProvider(rules), x)
    dtypes = sorted({str(v.dtype) for v in jax.tree.leaves(nnx.state(q))})
    out[f"{qtype}_weight_only"] = bench(jitted(q), x)
    out[f"{qtype}_stored_dtypes"] = dtypes
  return out


# ---- the document -----------------------------------------------------------------------
def run(quick: bool = False, rounds: int = 3, reps: int = 3) -> dict:
  from behaviour import _cpu

  from configs import gpt2_small

  doc = {"benchmark": "compress_quant", "quick": quick, "cpu": _cpu(),
         "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
         "modes": dict(MODES)}
  if quick:
    rounds, reps = 1, 1
  teacher_model = os.path.join(TEACHER, "model")
  if os.path.isdir(teacher_model):
    data_cfg = gpt2_small.get_config("mini").data
    doc["decoder"] = decoder_quality(teacher_model, os.path.join(TEACHER, "data"), data_cfg,
                                     max_batches=2 if quick else None)
    doc["decoder_speed"] = speed(teacher_model, rounds, reps)
  else:
    doc["decoder"] = {"skipped": f"no {teacher_model}"}
  bert = ensure_bert(quick)
  doc["bert"] = (bert_quality(bert) if bert else {"skipped": f"no {BERT} (not trained in "
                                                              "--quick)"})
  with tempfile.TemporaryDirectory() as tmp:
    raw = QUICK_GPT2 if quick else GPT2
    directory = write_gpt2(os.path.join(tmp, "gpt2"), raw)
    doc["speed"] = {"model": {k: raw[k] for k in ("n_embd", "n_layer", "n_head",
                                                 "vocab_size")},
                    "rounds": rounds, "reps": reps, "prompt": PROMPT, "new": NEW,
                    "modes": speed(directory, rounds, reps)}
  doc["matmul"] = _spawn("", "matmul", 10 if quick else 50)
  return doc


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--out", default=None)
  ap.add_argument("--worker", choices=(*MODES, "matmul"), help=argparse.SUPPRESS)
  ap.add_argument("--dir", help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.worker == "matmul":
    print(json.dumps({f"N{n}": matmul_profile(N=n, reps=a.reps) for n in (12288, 50257)}))
    return
  if a.worker:
    print(json.dumps(worker(a.dir, a.worker, a.reps)))
    return
  from common import write_json
  text = json.dumps(run(a.quick, a.rounds, a.reps), indent=1)
  write_json(text, a.out, out_name="compress_quant.json")
  print(text)


if __name__ == "__main__":
  main()
