"""Greedy decode speed: jaxlm.generate against transformers' `generate` (PyTorch, KV cache)
on the same weights, alternated in fresh processes.

Models (random weights, written once in Hugging Face format by jaxlm's save_pretrained,
then loaded by both sides): `gpt2` (GPT-2 small, 124M), `gpt2_d256` (the same with
d=256 and 4 layers, where a step is mostly overhead) and `llama` (Llama-shaped, GQA 12:4,
~110M). For each (model, weights dtype, batch) it times a prompt of 32 tokens with 1 and
with 64 new tokens (eos disabled), and reports

  prefill tokens/s  B * 32 / t(1 new token)
  decode tokens/s   B * 63 / (t(64) - t(1))
  bandwidth         (weight bytes + KV-cache bytes read per step) / decode step time, and
                    its fraction of this machine's memory bandwidth (a jitted sum over
                    256 MB, measured in the same run) -- on a GPU, of the HBM roofline.

`bf16` rows run jaxlm with bf16 weights (half the bytes a step streams) and compare with
transformers in fp32. Medians over --rounds alternated rounds, each a fresh process per
side; torch runs with torch.set_num_threads(os.cpu_count()).

  python benchmarks/decode.py [--rounds 3] [--out benchmarks/results/decode-cpu-DATE.json]
  python benchmarks/decode.py --quick        # tiny smoke run (seconds)
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

PROMPT, NEW = 32, 64
GPT2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 50257,
        "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True, "bos_token_id": 50256, "eos_token_id": 50256}
MODELS = {
    "gpt2": GPT2,
    "gpt2_d256": {**GPT2, "n_embd": 256, "n_layer": 4, "n_head": 4},
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
              "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
              "num_attention_heads": 12, "num_key_value_heads": 4, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 1,
              "eos_token_id": 2},
}
# (model, jaxlm weights dtype, batch); torch always runs fp32 weights.
CASES = [("gpt2", "fp32", 1), ("gpt2", "fp32", 8), ("gpt2", "bf16", 1), ("gpt2_d256", "fp32", 1),
         ("gpt2_d256", "fp32", 8), ("llama", "fp32", 1), ("llama", "fp32", 8)]
QUICK = {"gpt2": {**GPT2, "n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 512}}


def write_models(directory: str, models: dict) -> None:
  """Each model in HF format, random weights, via jaxlm (no torch needed)."""
  import jaxlm
  from jaxlm import hf
  for name, raw in models.items():
    cfg = hf.family_of(raw["architectures"][0], name).config_from_hf(raw).replace(
        architectures=raw["architectures"])
    jaxlm.build_model(cfg, seed=0).save_pretrained(os.path.join(directory, name))


def _bandwidth_gbs() -> float:
  """This machine's memory read bandwidth: a jitted sum over 256 MB, best of 10."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((64 << 20,), jnp.float32)
  f = jax.jit(jnp.sum)
  f(x).block_until_ready()
  best = min(_timed(lambda: f(x).block_until_ready()) for _ in range(10))
  return x.nbytes / best / 1e9


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def _prompt(B: int, vocab: int):
  import numpy as np
  return np.random.default_rng(0).integers(100, vocab - 100, (B, PROMPT)).astype(np.int64)


def worker_jaxlm(directory: str, dtype: str, B: int, reps: int) -> dict:
  import jax
  import numpy as np
  import jaxlm
  from jaxlm.params import flat_params
  model = jaxlm.from_pretrained(directory, dtype="bfloat16" if dtype == "bf16" else "float32")
  if dtype == "bf16":  # bf16 weights: rebuild with bf16 parameters
    from flax import nnx
    from jaxlm.models import auto
    cfg = model.config.replace(param_dtype="bfloat16")
    bf = auto.build_abstract_model(cfg, runtime=model.runtime)
    nnx.update(bf, jax.tree.map(lambda v: v.astype("bfloat16"), nnx.state(model, nnx.Param)))
    model = bf
  ids = _prompt(B, model.config.vocab_size)
  run = {n: (lambda n=n: np.asarray(jaxlm.generate(model, ids, max_new_tokens=n,
                                                   eos_token_id=-1))) for n in (1, NEW)}
  for n in run:
    run[n]()  # compile
  t1 = statistics.median(_timed(run[1]) for _ in range(reps))
  tn = statistics.median(_timed(run[NEW]) for _ in range(reps))
  weights = sum(v.nbytes for v in flat_params(model).values())
  cfg = model.config
  kv_per_token = 2 * cfg.num_hidden_layers * cfg.kv_heads * cfg.head_size * (
      2 if dtype == "bf16" else 4)
  return {"t_prefill_s": t1, "t_total_s": tn, "weight_bytes": weights,
          "kv_bytes_per_token_per_row": kv_per_token, "backend": jax.default_backend(),
          "device": jax.devices()[0].device_kind, "bandwidth_gbs": _bandwidth_gbs()}


def worker_torch(directory: str, B: int, reps: int) -> dict:
  import torch
  import transformers
  torch.set_num_threads(os.cpu_count())
  model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32, attn_implementation="sdpa").eval()
  ids = torch.tensor(_prompt(B, model.config.vocab_size))
  mask = torch.ones_like(ids)

  def run(n):
    with torch.no_grad():
      model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                     do_sample=False, pad_token_id=0, eos_token_id=None)

  for n in (1, NEW):
    run(n)
  t1 = statistics.median(_timed(lambda: run(1)) for _ in range(reps))
  tn = statistics.median(_timed(lambda: run(NEW)) for _ in range(reps))
  return {"t_prefill_s": t1, "t_total_s": tn, "torch": torch.__version__,
          "transformers": transformers.__version__}


def _spawn(args: list[str]) -> dict:
  out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
  if out.returncode:
    return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(r: dict, B: int) -> dict:
  decode_s = (r["t_total_s"] - r["t_prefill_s"]) / (NEW - 1)
  return {"prefill_tok_s": B * PROMPT / r["t_prefill_s"], "decode_tok_s": B / decode_s,
          "step_ms": decode_s * 1e3}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--out", default=None)
  ap.add_argument("--worker", choices=("jaxlm", "torch"), help=argparse.SUPPRESS)
  ap.add_argument("--dir", help=argparse.SUPPRESS)
  ap.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
  ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.worker:
    fn = (worker_jaxlm(a.dir, a.dtype, a.batch, a.reps) if a.worker == "jaxlm"
          else worker_torch(a.dir, a.batch, a.reps))
    print(json.dumps(fn))
    return
  from behaviour import _cpu  # the machine's name, as every result file records it
  from common import write_json
  try:
    import torch  # noqa: F401
    have_torch = True
  except ImportError:
    have_torch = False
  models = QUICK if a.quick else MODELS
  cases = [("gpt2", "fp32", 1)] if a.quick else CASES
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    write_models(tmp, models)
    samples = {c: {"jaxlm": [], "torch": []} for c in cases}
    for _ in range(1 if a.quick else a.rounds):
      for case in cases:
        name, dtype, B = case
        common_args = ["--dir", os.path.join(tmp, name), "--batch", str(B),
                       "--reps", str(a.reps)]
        samples[case]["jaxlm"].append(_spawn(["--worker", "jaxlm", "--dtype", dtype,
                                              *common_args]))
        if have_torch:
          samples[case]["torch"].append(_spawn(["--worker", "torch", *common_args]))
    for (name, dtype, B), sides in samples.items():
      row = {"model": name, "jaxlm_weights": dtype, "batch": B, "prompt": PROMPT, "new": NEW}
      ok = [r for r in sides["jaxlm"] if "error" not in r]
      if not ok:
        row["error"] = sides["jaxlm"][0]["error"]
        rows.append(row)
        continue
      js = [_summary(r, B) for r in ok]
      med = lambda rs, k: statistics.median(x[k] for x in rs)  # noqa: E731
      row["jaxlm"] = {k: med(js, k) for k in js[0]}
      last = ok[-1]
      step_s = row["jaxlm"]["step_ms"] / 1e3
      kv = last["kv_bytes_per_token_per_row"] * B * (PROMPT + NEW / 2)  # mean cache read
      row["bytes_per_step"] = last["weight_bytes"] + kv
      row["bandwidth_gbs"] = row["bytes_per_step"] / step_s / 1e9
      row["machine_bandwidth_gbs"] = med(ok, "bandwidth_gbs")
      row["bandwidth_fraction"] = row["bandwidth_gbs"] / row["machine_bandwidth_gbs"]
      ts = [_summary(r, B) for r in sides["torch"] if "error" not in r]
      if ts:
        row["torch_fp32"] = {k: med(ts, k) for k in ts[0]}
        row["decode_speedup"] = row["jaxlm"]["decode_tok_s"] / row["torch_fp32"]["decode_tok_s"]
        row["prefill_speedup"] = (row["jaxlm"]["prefill_tok_s"]
                                  / row["torch_fp32"]["prefill_tok_s"])
      elif sides["torch"]:
        row["torch_error"] = sides["torch"][0]["error"]
      rows.append(row)
      print(json.dumps(row), file=sys.stderr, flush=True)
  doc = {"benchmark": "decode", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": _cpu(),
         "rounds": a.rounds, "reps": a.reps, "rows": rows}
  text = json.dumps(doc, indent=1)
  write_json(text, a.out, out_name="decode.json")
  print(text)


if __name__ == "__main__":
  main()
