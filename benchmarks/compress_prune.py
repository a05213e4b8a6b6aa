"""Pruning (issue 15): magnitude against Wanda, at 50% unstructured and 2:4, on the trained
decoder, each before and after a short recovery fine-tune with the masks fixed.

  python benchmarks/compress_prune.py            # runs/compress_teacher, ~4 min
  python benchmarks/compress_prune.py --quick    # a tiny decoder trained here, ~3 min

--quick checks the plumbing only: its decoder (d 64, 400 steps) is too little trained to
have the large activation features Wanda exploits, and there the two methods tie.

Model: runs/compress_teacher/model (configs/gpt2_small.py:mini: 4 layers, d 128, vocab
4,096, 2,000 steps), with the run's own config (experiment.json: data, dtype, seed) and
prepared corpus (read only). Perplexity: next-token, on the whole validation split
(jaxlm.train.evaluator, the run's packing and dtype). Calibration (Wanda): the first 128
packed train rows. Recovery: RECOVERY_STEPS steps of the causal loss on the train split
(batch 32; AdamW at RECOVERY_LR after 10 warmup steps, cosine to 10%, no weight decay)
with the masks fixed (jaxlm/compress/recover.py); a control fine-tunes the dense model
the same way, so the recovery gain can be told apart from the gain of training longer.
`extras` prune without recovery by other scopes (magnitude per output neuron / globally,
Wanda per layer, Wanda from the dense model's activations only) to separate what the
activations contribute from what the comparison group does. Prints JSON (stdout);
progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)

from behaviour import _cpu

RECOVERY_STEPS, QUICK_RECOVERY_STEPS = 100, 40
RECOVERY_LR = 3e-4
CALIBRATION_SEQUENCES = 128
QUICK_TRAIN_STEPS = 400
MAIN = (("magnitude", "unstructured"), ("wanda", "unstructured"), ("magnitude", "2:4"),
        ("wanda", "2:4"))
EXTRAS = (("magnitude", "unstructured", {"scope": "output"}),
          ("magnitude", "unstructured", {"scope": "global"}),
          ("wanda", "unstructured", {"scope": "layer"}),
          ("wanda", "unstructured", {"sequential": False}),
          ("wanda", "2:4", {"sequential": False}))


from common import write_json  # noqa: E402 (benchmarks/common.py)


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _quick_setup(tmp: str):
  """A tiny decoder (configs/gpt2_small.py:tiny) trained here on the embedded corpus."""
  from configs import gpt2_small
  from jaxlm import experiment, tasks
  from jaxlm.compress.recover import recover, train_config
  from jaxlm.data.corpus import prepare_corpus
  from jaxlm.models import auto

  cfg = gpt2_small.get_config("tiny")
  corpus = prepare_corpus(cfg.data, cfg.tokenizer, os.path.join(tmp, "data"), log=log)
  task = tasks.get("causal")
  mc = experiment.model_config(cfg).replace(**task.model_ids(corpus.tokenizer, cfg.data))
  model = auto.build_model(mc, runtime=experiment.runtime(cfg), seed=cfg.seed)
  it = task.train_iterator(corpus, cfg.data, batch_size=16, seed=cfg.seed)
  out = recover(model, {}, it, steps=QUICK_TRAIN_STEPS,  # no masks: plain training
                train=train_config(learning_rate=3e-3, warmup_steps=40))
  log(f"quick: trained {QUICK_TRAIN_STEPS} steps, loss {out['losses'][-1]:.3f}")
  return cfg, corpus, model


def _teacher_setup(workdir: str):
  import ml_collections

  from jaxlm import from_pretrained
  from jaxlm.data.corpus import load_corpus

  with open(os.path.join(workdir, "experiment.json"), encoding="utf-8") as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  corpus = load_corpus(os.path.join(workdir, "data"))
  model = from_pretrained(os.path.join(workdir, "model"), dtype=cfg.model.dtype)
  return cfg, corpus, model


def run(quick: bool = False, teacher: str | None = None) -> dict:
  """Prunes, evaluates and recovers every configuration; returns the JSON document."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jaxlm import tasks
  from jaxlm.compress.prune import calibration_batches, layer_sparsity, prune
  from jaxlm.compress.recover import evaluator, mask_violations, recover, train_config

  t_start = time.time()
  tmp = tempfile.mkdtemp(prefix="compress_prune_") if quick else None
  teacher = teacher or os.path.join(ROOT, "runs", "compress_teacher")
  try:
    cfg, corpus, model = _quick_setup(tmp) if quick else _teacher_setup(teacher)
    cfg.eval.max_batches = 0  # the whole validation split
    steps = QUICK_RECOVERY_STEPS if quick else RECOVERY_STEPS
    train = train_config(learning_rate=RECOVERY_LR, warmup_steps=10, decay="cosine",
                         end_learning_rate_factor=0.1, weight_decay=0.0)
    task = tasks.get("causal")
    evaluate = evaluator(model, corpus, cfg)
    dense = jax.tree.map(jnp.copy, nnx.state(model))  # nnx.state holds live references

    def reset():
      nnx.update(model, jax.tree.map(jnp.copy, dense))

    def batches():  # the same recovery batches for every configuration
      return task.train_iterator(corpus, cfg.data, batch_size=32, seed=cfg.seed + 7)

    before = evaluate(model)
    log(f"dense: val perplexity {before['perplexity']:.3f}")
    cal = calibration_batches(corpus, cfg.data, sequences=CALIBRATION_SEQUENCES,
                              batch_size=32, seed=cfg.seed)
    control = recover(model, {}, batches(), steps=steps, train=train)
    dense_ft = evaluate(model)["perplexity"]
    log(f"dense fine-tuned {steps} steps: {dense_ft:.3f}")
    results = {}
    for method, pattern in MAIN:
      reset()
      t0 = time.time()
      _, rep = prune(model, method, pattern=pattern,
                     calibration=cal if method == "wanda" else None)
      prune_s = time.time() - t0
      rep.perplexity["before"] = before["perplexity"]
      rep.perplexity["after"] = evaluate(model)["perplexity"]
      rec = recover(model, rep, batches(), steps=steps, train=train)
      rep.perplexity["recovered"] = evaluate(model)["perplexity"]
      row = rep.to_dict()
      row.update(prune_seconds=round(prune_s, 2), recovery_seconds=round(rec["seconds"], 1),
                 recovery_loss_first_last=[round(rec["losses"][0], 4),
                                           round(rec["losses"][-1], 4)],
                 zeros_kept_after_recovery=mask_violations(model, rep.masks) == 0,
                 min_layer_sparsity_after_recovery=min(
                     layer_sparsity(model, rep.masks).values()))
      results[f"{method} {pattern}"] = row
      log(f"{method} {pattern}: sparsity {rep.sparsity:.4f}, perplexity "
          f"{rep.perplexity['after']:.3f} -> {rep.perplexity['recovered']:.3f} recovered")
    extras = {}
    for method, pattern, kw in EXTRAS:
      reset()
      _, rep = prune(model, method, pattern=pattern,
                     calibration=cal if method == "wanda" else None, **kw)
      name = f"{method} {pattern} " + " ".join(f"{k}={v}" for k, v in kw.items())
      extras[name] = {"sparsity": rep.sparsity, "perplexity": evaluate(model)["perplexity"]}
      log(f"{name}: {extras[name]}")
    mag, wan = results["magnitude unstructured"], results["wanda unstructured"]
    doc = {
        "benchmark": "compress_prune", "quick": quick, "cpu": _cpu(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": "(tiny decoder trained here)" if quick else os.path.relpath(teacher, ROOT),
        "dtype": cfg.model.dtype,
        "val_tokens_note": "whole validation split, next-token perplexity",
        "calibration_sequences": CALIBRATION_SEQUENCES,
        "recovery": {"steps": steps, "batch_size": 32, "learning_rate": RECOVERY_LR,
                     "warmup_steps": 10, "decay": train.decay},
        "dense_perplexity": before["perplexity"],
        "dense_finetuned_perplexity": dense_ft,
        "dense_finetune_seconds": round(control["seconds"], 1),
        "results": results, "extras": extras,
        "wanda_at_most_magnitude_50pct": (wan["perplexity"]["after"]
                                          <= mag["perplexity"]["after"]),
        "wanda_at_most_magnitude_2_4": (results["wanda 2:4"]["perplexity"]["after"]
                                        <= results["magnitude 2:4"]["perplexity"]["after"]),
        "seconds": round(time.time() - t_start, 1),
    }
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  return doc


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--teacher", default=None, help="the trained run's workdir (full run)")
  ap.add_argument("--out", default=None)
  a = ap.parse_args()
  text = json.dumps(run(a.quick, a.teacher), indent=1)
  print(text)
  write_json(text, a.out)


if __name__ == "__main__":
  main()
