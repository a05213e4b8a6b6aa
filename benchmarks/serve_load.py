"""A bounded load test of `python -m jaxlm.serve` on 127.0.0.1: continuous batching
(--slots=32) against the same server decoding one request at a time (--slots=1).

  python benchmarks/serve_load.py                 # 32 clients x 4 requests, each server once
  python benchmarks/serve_load.py --rounds=2 --out=benchmarks/results/serve-load-cpu-DATE.json

N clients each send M streaming completions one after another, with mixed prompt lengths
(5-100 words of Shakespeare, shortened where prompt and output would not fit --max_len)
and output lengths (16-128 tokens), the same requests for both servers, at temperature 0. Reported per server: generated tokens/s over the whole
load (from each response's usage), time to first token and inter-token latency (p50 and
p99, as the client sees them), and errors. Servers run in fresh processes, alternating
A/B when --rounds > 1; figures are medians over rounds.

The model, unless --model is given, is a random-weight Llama the size of GPT-2 small
(12 layers, 768 wide, GQA 12:4, 1,024 positions; 95M parameters) with a WordPiece
vocabulary of 8,192 trained on the corpus: weights do not change the cost of a token,
and random weights rarely emit eos.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from behaviour import _cpu  # noqa: E402  (benchmarks/behaviour.py)
from common import ROOT, write_json  # noqa: E402


def make_model(directory: str) -> None:
  import jaxlm
  from jaxlm.data.sources import iter_documents
  from jaxlm.data.tokenizer import train_tokenizer
  texts = [d.text for d in iter_documents("embedded")]
  tok = train_tokenizer(texts, kind="wordpiece", vocab_size=8192)
  cfg = jaxlm.ModelConfig(
      model_type="llama", architectures=["LlamaForCausalLM"], causal=True,
      vocab_size=tok.vocab_size, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
      num_key_value_heads=4, intermediate_size=2048, max_position_embeddings=1024,
      hidden_act="silu", norm_type="rmsnorm", norm_position="pre", mlp_type="gated",
      mlp_bias=False, attention_bias=False, position_embedding_type="rope",
      layer_norm_eps=1e-6, type_vocab_size=0, tie_word_embeddings=False,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
      eos_token_id=tok.token_to_id("[SEP]"))
  jaxlm.save_pretrained(jaxlm.build_model(cfg, seed=0), directory)
  tok.save(directory)


def workload(model: str, clients: int, per_client: int, max_len: int,
             seed: int = 0) -> list[list[dict]]:
  """Each client's request bodies: corpus text of 5-100 words, 16-128 new tokens, the
  prompt shortened where the two would not fit `max_len` tokens."""
  import jaxlm
  from jaxlm.data.sources import iter_documents
  tok = jaxlm.load_tokenizer(model)
  words = " ".join(d.text for d in iter_documents("embedded")).split()
  rng = random.Random(seed)
  out = []
  for _ in range(clients):
    reqs = []
    for _ in range(per_client):
      n, start, new = rng.randint(5, 100), rng.randrange(len(words) - 200), rng.randint(16, 128)
      while len(tok.encode(" ".join(words[start:start + n]))) + new > max_len:
        n -= 1
      reqs.append({"prompt": " ".join(words[start:start + n]), "max_tokens": new,
                   "temperature": 0, "stream": True,
                   "stream_options": {"include_usage": True}})
    out.append(reqs)
  return out


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


async def _one(client, url: str, body: dict, rec: dict) -> None:
  t0 = time.perf_counter()
  last = None
  async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
    if r.status_code != 200:
      rec["errors"] += 1
      await r.aread()
      return
    async for line in r.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      chunk = json.loads(line[6:])
      if "error" in chunk:
        rec["errors"] += 1
        return
      if chunk.get("usage"):
        rec["tokens"] += chunk["usage"]["completion_tokens"]
      if chunk["choices"] and chunk["choices"][0]["text"]:
        now = time.perf_counter()
        if last is None:
          rec["ttft"].append(now - t0)
        else:
          rec["itl"].append(now - last)
        last = now


async def _load(url: str, plan: list[list[dict]]) -> dict:
  import httpx
  rec = {"tokens": 0, "errors": 0, "ttft": [], "itl": []}
  limits = httpx.Limits(max_connections=len(plan) + 4)
  async with httpx.AsyncClient(timeout=600, limits=limits) as client:
    async def user(reqs):
      for body in reqs:
        try:
          await _one(client, url, body, rec)
        except httpx.HTTPError:
          rec["errors"] += 1
    t0 = time.perf_counter()
    await asyncio.gather(*(user(r) for r in plan))
    rec["wall_s"] = time.perf_counter() - t0
  return rec


def _pct(xs: list[float], q: float) -> float:
  xs = sorted(xs)
  return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _steps(url: str) -> float:
  import httpx
  text = httpx.get(f"{url}/metrics").text
  return float(next(ln.split()[-1] for ln in text.splitlines()
                    if ln.startswith("jaxlm_decode_steps ")))


def run_server(model: str, slots: int, plan, warm, max_len: int) -> dict:
  port = _port()
  url = f"http://127.0.0.1:{port}"
  log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
  proc = subprocess.Popen([sys.executable, "-m", "jaxlm.serve", f"--model={model}",
                           f"--port={port}", f"--slots={slots}", f"--max_len={max_len}",
                           "--max_queue=1024",
                           "--log_level=warning"], cwd=ROOT, stdout=log,
                          stderr=subprocess.STDOUT)
  try:
    import httpx
    deadline = time.time() + 300
    while True:
      if proc.poll() is not None or time.time() > deadline:
        log.seek(0)
        sys.exit(f"the server did not start:\n{log.read()[-3000:]}")
      try:
        if httpx.get(f"{url}/health").status_code == 200:
          break
      except httpx.TransportError:
        time.sleep(0.2)
    asyncio.run(_load(url, warm))  # compiles every prompt bucket before the clock starts
    steps0 = _steps(url)
    rec = asyncio.run(_load(url, plan))
    rec["steps"] = _steps(url) - steps0
  finally:
    proc.terminate()
    proc.wait(60)
  return {"slots": slots, "tokens": rec["tokens"], "errors": rec["errors"],
          "wall_s": round(rec["wall_s"], 2),
          "tokens_per_s": round(rec["tokens"] / rec["wall_s"], 1),
          "decode_steps": int(rec["steps"]),
          "mean_batch": round(rec["tokens"] / max(rec["steps"], 1), 1),
          "ttft_p50_s": round(_pct(rec["ttft"], 0.5), 4),
          "ttft_p99_s": round(_pct(rec["ttft"], 0.99), 4),
          "itl_p50_s": round(_pct(rec["itl"], 0.5), 4),
          "itl_p99_s": round(_pct(rec["itl"], 0.99), 4)}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default=None, help="a model directory (default: build one)")
  p.add_argument("--clients", type=int, default=32)
  p.add_argument("--requests", type=int, default=4, help="per client")
  p.add_argument("--slots", type=int, default=32)
  p.add_argument("--max_len", type=int, default=256,
                 help="tokens per slot (each step attends over all of them)")
  p.add_argument("--rounds", type=int, default=1)
  p.add_argument("--out", default=None)
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    model = args.model or os.path.join(tmp, "model")
    if args.model is None:
      make_model(model)
    plan = workload(model, args.clients, args.requests, args.max_len)
    warm = [[{**plan[0][0], "prompt": " ".join(["the"] * n), "max_tokens": 2}]
            for n in (4, 20, 40, 90, 200)]
    runs = {"continuous": [], "sequential": []}
    for _ in range(args.rounds):
      runs["continuous"].append(run_server(model, args.slots, plan, warm, args.max_len))
      runs["sequential"].append(run_server(model, 1, plan, warm, args.max_len))
  med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
  result = {
      "benchmark": "serve_load", "cpu": _cpu(), "date": time.strftime("%Y-%m-%d"),
      "model": args.model or "random Llama 12x768, GQA 12:4, vocab 8192, 1024 positions",
      "clients": args.clients, "requests_per_client": args.requests,
      "prompt_words": "5-100", "max_tokens": "16-128", "max_len": args.max_len,
      "rounds": args.rounds,
      "continuous": med["continuous"], "sequential": med["sequential"],
      "throughput_ratio": round(med["continuous"]["tokens_per_s"]
                                / med["sequential"]["tokens_per_s"], 2),
      "all_rounds": runs}
  text = json.dumps(result, indent=1)
  print(text)
  write_json(text, args.out, out_name="serve_load.json")


if __name__ == "__main__":
  main()
