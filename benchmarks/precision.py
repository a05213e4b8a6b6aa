"""bf16 against fp32 training speed of jaxlm's train step on this machine.

The BERT-MLM+NSP step of configs/bert_tiny.py (full shape: 2 layers, 128 wide, vocab
8192, 32 x 128 tokens) and the Llama-shaped decoder of configs/llama_1b.py:tiny widened
to 256, on synthetic batches. `train.precision` fp32 and bf16 alternate over rounds so
machine drift cancels; prints JSON with median tokens/s per precision and the ratio.

  python benchmarks/precision.py [--rounds 3] [--steps 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import bert_batch, causal_batch, write_json  # noqa: E402  (benchmarks/common.py)
from configs import bert_tiny, llama_1b  # noqa: E402
from jaxlm import experiment, tasks  # noqa: E402
from jaxlm.models import auto  # noqa: E402
from jaxlm.train.optim import make_optimizer  # noqa: E402
from jaxlm.train.steps import make_train_step  # noqa: E402


def setups():
  bert = bert_tiny.get_config()
  bert.model.update(max_position_embeddings=128, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
  llama = llama_1b.get_config("tiny")
  llama.model.update(hidden_size=256, intermediate_size=768, num_attention_heads=8,
                     num_key_value_heads=2, num_hidden_layers=4)
  return {"bert_mlm": (bert, "mlm+nsp", bert_batch, 32, 128),
          "llama": (llama, "causal", causal_batch, 8, 256)}


def time_steps(cfg, objective, make_batch, B, T, precision, steps):
  cfg.train.precision = precision
  mc = experiment.model_config(cfg).replace(vocab_size=8192, pad_token_id=0, eos_token_id=1)
  model = auto.build_model(mc, runtime=experiment.runtime(cfg), seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  tx, _ = make_optimizer(cfg.train)
  opt_state = tx.init(params)
  step = make_train_step(graphdef, tx, tasks.get(objective), seed=0, dropout=False)
  batch = jax.device_put(make_batch(np.random.default_rng(0), B, T, 8192))
  params, opt_state, m = step(params, opt_state, batch, 0)  # compile
  jax.block_until_ready(m)
  times = []
  for s in range(steps):
    t0 = time.perf_counter()
    params, opt_state, m = step(params, opt_state, batch, s + 1)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  return B * T / statistics.median(times), float(m["loss"])


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
         "jax": jax.__version__, "rounds": args.rounds, "steps_per_round": args.steps,
         "models": {}}
  for name, (cfg, objective, make_batch, B, T) in setups().items():
    tok_s = {"fp32": [], "bf16": []}
    for _ in range(args.rounds):
      for precision in ("fp32", "bf16"):
        tok_s[precision].append(time_steps(cfg, objective, make_batch, B, T, precision,
                                           args.steps)[0])
    med = {p: statistics.median(v) for p, v in tok_s.items()}
    out["models"][name] = {"batch": B, "seq_len": T, "tokens_per_s": tok_s,
                           "median_tokens_per_s": med,
                           "bf16_speedup": med["bf16"] / med["fp32"]}
  text = json.dumps(out, indent=2)
  print(text)
  write_json(text, args.out, out_name="precision.json")


if __name__ == "__main__":
  main()
