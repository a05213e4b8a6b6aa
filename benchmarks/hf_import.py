"""Times `jaxlm.from_pretrained` on a 124M-parameter GPT-2-shaped Hugging Face checkpoint.

The checkpoint (config.json + model.safetensors, random fp32 weights, written from NumPy;
no torch needed) goes to a temporary directory unless --dir names one. Prints JSON:
{"params": ..., "seconds_median": ..., "runs": [...]}.

  python benchmarks/hf_import.py [--runs 3] [--dir /tmp/gpt2_124m]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
from safetensors.numpy import save_file

CONFIG = {
    "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 50257,
    "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
    "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
    "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "bos_token_id": 50256,
    "eos_token_id": 50256, "tie_word_embeddings": True, "scale_attn_weights": True,
}


def gpt2_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """HF GPT2LMHeadModel tensor names and shapes (Conv1D weights [in, out]; head tied)."""
  rng = np.random.default_rng(seed)
  d, v, p = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]

  def w(*shape):
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

  t = {"transformer.wte.weight": w(v, d), "transformer.wpe.weight": w(p, d),
       "transformer.ln_f.weight": np.ones(d, np.float32),
       "transformer.ln_f.bias": np.zeros(d, np.float32)}
  for i in range(cfg["n_layer"]):
    h = f"transformer.h.{i}"
    t.update({
        f"{h}.ln_1.weight": np.ones(d, np.float32), f"{h}.ln_1.bias": np.zeros(d, np.float32),
        f"{h}.attn.c_attn.weight": w(d, 3 * d), f"{h}.attn.c_attn.bias": w(3 * d),
        f"{h}.attn.c_proj.weight": w(d, d), f"{h}.attn.c_proj.bias": w(d),
        f"{h}.ln_2.weight": np.ones(d, np.float32), f"{h}.ln_2.bias": np.zeros(d, np.float32),
        f"{h}.mlp.c_fc.weight": w(d, 4 * d), f"{h}.mlp.c_fc.bias": w(4 * d),
        f"{h}.mlp.c_proj.weight": w(4 * d, d), f"{h}.mlp.c_proj.bias": w(d),
    })
  return t


def write_checkpoint(directory: str) -> int:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(CONFIG, f, indent=2)
  tensors = gpt2_tensors(CONFIG)
  save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  return sum(int(a.size) for a in tensors.values())


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: temp)")
  args = ap.parse_args(argv)

  import jax
  from flax import nnx

  import jaxlm

  with tempfile.TemporaryDirectory() as tmp:
    directory = args.dir or tmp
    params = write_checkpoint(directory)
    runs = []
    for _ in range(args.runs):
      start = time.perf_counter()
      model = jaxlm.from_pretrained(directory)
      jax.block_until_ready(nnx.state(model))  # transfers are async
      runs.append(round(time.perf_counter() - start, 3))
      del model
  from behaviour import _cpu  # noqa: PLC0415 (benchmarks/behaviour.py: the CPU's name)
  result = {"params": params, "seconds_median": statistics.median(runs), "runs": runs,
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, jax {jax.__version__} "
                       f"({jax.default_backend()})", "cpu": _cpu(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
