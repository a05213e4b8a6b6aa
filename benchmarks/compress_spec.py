"""Speculative decoding speed: a trained decoder (runs/spec_teacher: configs/gpt2_small.py:medium,
6 layers, d 384) alone, against the same decoder with a student distilled from it
(runs/spec_student: configs/distill_gpt2.py with that teacher, 2 layers, d 128) as its
draft; greedy, batch 1, validation-split prompts. (The 4-layer d 128 :mini decoder is too
small a target: its decode step is mostly per-step overhead, which a 2-layer draft pays
nearly in full, so no draft can make it faster.)

Both run in this process, alternated round by round (each round: every prompt, each
setting once); medians over rounds. The outputs are checked equal (greedy speculative
decoding must reproduce the target's tokens).

  python benchmarks/compress_spec.py [--rounds 5] [--teacher DIR] [--draft DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

TEACHER = os.path.join(ROOT, "runs", "spec_teacher")
STUDENT = os.path.join(ROOT, "runs", "spec_student")
PROMPT_TOKENS, NEW = 24, 64


def _model_dir(path: str) -> str:
  return os.path.join(path, "model") if os.path.isdir(os.path.join(path, "model")) else path


def prompts(teacher: str, n: int) -> list:
  """n prompts of PROMPT_TOKENS tokens, cut from validation-split documents."""
  import jaxlm  # noqa: PLC0415
  tok = jaxlm.load_tokenizer(_model_dir(teacher))
  with open(os.path.join(teacher, "data", "validation.jsonl"), encoding="utf-8") as f:
    docs = [json.loads(line)["text"] for line in f]
  out = []
  for doc in docs:
    ids = tok.encode(doc)
    ids = ids.ids if hasattr(ids, "ids") else list(ids)
    for start in range(200, len(ids) - PROMPT_TOKENS, 2000):
      out.append(ids[start:start + PROMPT_TOKENS])
      if len(out) == n:
        return out
  return out


def run(quick: bool = False, teacher: str = TEACHER, draft: str = STUDENT,
        rounds: int = 5, ks=(2, 3, 4)) -> dict:
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  import jaxlm  # noqa: PLC0415
  from jaxlm.generate.sampling import Sampling  # noqa: PLC0415
  from jaxlm.generate.speculative import speculative_generate  # noqa: PLC0415

  target = jaxlm.from_pretrained(_model_dir(teacher))
  student = jaxlm.from_pretrained(_model_dir(draft))
  ps = prompts(teacher, 2 if quick else 8)
  new = 16 if quick else NEW
  rounds = 1 if quick else rounds
  ks = ks[:1] if quick else ks

  def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out

  settings = {"target": lambda p: jaxlm.generate(target, [p], max_new_tokens=new,
                                                 eos_token_id=-1),
              "draft_alone": lambda p: jaxlm.generate(student, [p], max_new_tokens=new,
                                                      eos_token_id=-1)}
  for k in ks:
    settings[f"speculative_k{k}"] = (
        lambda p, k=k: speculative_generate(target, student, [p], max_new_tokens=new,
                                            num_draft_tokens=k, s=Sampling(), eos_token_id=-1,
                                            return_stats=True))
  for fn in settings.values():  # compile
    fn(ps[0])
  times = {name: [] for name in settings}
  accepted = {name: [] for name in settings if name.startswith("spec")}
  mismatches = 0
  for _ in range(rounds):
    for p in ps:
      ref = None
      for name, fn in settings.items():
        dt, out = timed(lambda fn=fn, p=p: fn(p))
        times[name].append(dt)
        if name == "target":
          ref = out
        elif name.startswith("spec"):
          tokens, stats = out
          accepted[name].append(stats["mean_accepted"])
          mismatches += int(not np.array_equal(tokens, ref))
  tok_s = {name: new / statistics.median(ts) for name, ts in times.items()}
  from compress import cpu_name  # noqa: PLC0415 (benchmarks/compress.py)
  result = {
      "device": f"{jax.devices()[0].device_kind}", "cpu": cpu_name(),
      "target": _model_dir(teacher), "draft": _model_dir(draft),
      "target_params": sum(x.size for x in jax.tree.leaves(nnx.state(target, nnx.Param))),
      "draft_params": sum(x.size for x in jax.tree.leaves(nnx.state(student, nnx.Param))),
      "batch": 1, "prompt_tokens": PROMPT_TOKENS, "new_tokens": new, "prompts": len(ps),
      "rounds": rounds, "tokens_per_s": {k: round(v, 1) for k, v in tok_s.items()},
      "speedup_vs_target": {k: round(v / tok_s["target"], 3) for k, v in tok_s.items()},
      "mean_accepted": {k: round(statistics.mean(v), 3) for k, v in accepted.items()},
      "outputs_differing_from_target": mismatches,
  }
  return result


if __name__ == "__main__":
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--teacher", default=TEACHER)
  ap.add_argument("--draft", default=STUDENT)
  a = ap.parse_args()
  print(json.dumps(run(a.quick, a.teacher, a.draft, a.rounds), indent=1))
