"""Retrieval speed (issue 17): the exact JAX index against faiss, HNSW recall, and how fast
a BERT embeds chunks.

  python benchmarks/retrieval.py [--out FILE]        # ~10 min on 2 cores
  python benchmarks/retrieval.py --quick             # 1e4 / 1e5 vectors, a minute

Sections of the JSON document (stdout; progress on stderr):
  search     for N in 1e5 and 1e6 random unit vectors of dimension 128 (seeded) and k=10:
             queries/s at batch 64 and at batch 1 of jaxlm's ExactIndex and of faiss
             IndexFlatIP (default settings), in the same process, alternated in each of
             `--rounds` rounds (medians; fresh queries every round); the agreement of their
             top-10 ids; the naive JAX form (top_k over the whole [64, N] score matrix);
             and faiss tuned, so the baseline is no strawman: at batch 64 on its BLAS path
             (distance_compute_blas_threshold 20; faiss-cpu 1.15's default of 128000 keeps
             64 queries off it), also with other BLAS block sizes; at batch 1 on one
             OpenMP thread.
  top_k      XLA:CPU's top_k against a max over the same [64, N] scores: why ExactIndex
             takes top_k over group maxima (store.py), not over whole rows.
  hnsw       faiss IndexHNSWFlat (M 32, efConstruction 80) on the same vectors: build time,
             recall@10 against the exact top-10 over 1,000 queries, and queries/s at batch
             64, for efSearch 16 / 64 / 256 / 1024.
  embed      chunks/s of DenseRetriever.embed with the main job's BERT (runs/default/model
             when it exists; else a randomly initialized BERT of configs/default.py's shape,
             which embeds at the same speed, and `model` says so) over the embedded corpus
             chunked to the encoder's 126 tokens with 16 of overlap, in f32 and bf16.

Other engineers' jobs share this machine's two cores: `load_avg` (1-minute load average
before and after each section) says how busy it was.
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

import faiss
import jax
import jax.numpy as jnp
import numpy as np
from common import write_json
from jax import lax
from run_cpu import machine_info

from jaxlm.retrieval import DenseRetriever, ExactIndex, chunk_documents

RAG_BERT = os.path.join(ROOT, "runs", "default", "model")
CORPUS_TOKENIZER = os.path.join(ROOT, "runs", "compress_teacher", "data")
K, BATCH = 10, 64


def log(msg: str) -> None:
  print(f"[retrieval] {msg}", file=sys.stderr, flush=True)


def load() -> float:
  return round(os.getloadavg()[0], 2)


def unit_vectors(rng, n: int, d: int) -> np.ndarray:
  x = rng.standard_normal((n, d), dtype=np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def timed(fn, *args):
  """(seconds, result) of fn(*args), the result ready."""
  t = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return time.perf_counter() - t, out


def seconds(fn, *args) -> float:
  return timed(fn, *args)[0]


def each(fn, batches, k):
  """fn(batch, k) for every batch (batch-1 queries, one call each)."""
  return [fn(b, k) for b in batches]


def exact_ids(x_ND, q_QD, k: int) -> np.ndarray:
  """Brute-force NumPy top-k ids, 256 queries at a time."""
  out = []
  for a in range(0, len(q_QD), 256):
    s = q_QD[a:a + 256] @ x_ND.T
    top = np.argpartition(-s, k, axis=1)[:, :k]
    out.append(np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, 1), 1), 1))
  return np.concatenate(out)


# ---- exact search ----------------------------------------------------------------------------
def search_section(n: int, dim: int, rounds: int, singles: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  x = unit_vectors(rng, n, dim)
  q = unit_vectors(rng, BATCH * (rounds + 1) + singles * (rounds + 1), dim)
  q64 = [q[i * BATCH:(i + 1) * BATCH] for i in range(rounds + 1)]
  q1 = q[BATCH * (rounds + 1):].reshape(rounds + 1, singles, 1, dim)
  before = load()
  t = time.perf_counter()
  exact = ExactIndex(x)
  jax.block_until_ready(exact.blocks)
  t_build = time.perf_counter() - t
  flat = faiss.IndexFlatIP(dim)
  t = time.perf_counter()
  flat.add(x)
  t_faiss_build = time.perf_counter() - t
  t_compile = seconds(exact.search, q64[0], K) + seconds(exact.search, q1[0, 0], K)
  flat.search(q64[0], K)
  flat.search(q1[0, 0], K)
  times = {"jax_b64": [], "faiss_b64": [], "jax_b1": [], "faiss_b1": []}
  agree = []
  for r in range(1, rounds + 1):
    t, (jax_ids, _) = timed(exact.search, q64[r], K)
    times["jax_b64"].append(t)
    t, (_, faiss_ids) = timed(flat.search, q64[r], K)
    times["faiss_b64"].append(t)
    agree.append(float(np.mean([len(set(a) & set(b)) / K for a, b in
                                zip(jax_ids, faiss_ids)])))
    times["jax_b1"].append(seconds(each, exact.search, q1[r], K) / singles)
    times["faiss_b1"].append(seconds(each, flat.search, q1[r], K) / singles)
    log(f"N={n} round {r}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in times.items()))
  med = {k: statistics.median(v) for k, v in times.items()}
  res = {
      "n": n, "dim": dim, "k": K, "rounds": rounds, "singles_per_round": singles,
      "build_s": {"jax_exact": round(t_build, 3), "faiss_flat": round(t_faiss_build, 3),
                  "jax_first_calls_compile_s": round(t_compile, 3)},
      "qps": {"jax_exact_b64": round(BATCH / med["jax_b64"], 1),
              "faiss_flat_b64": round(BATCH / med["faiss_b64"], 1),
              "jax_exact_b1": round(1 / med["jax_b1"], 1),
              "faiss_flat_b1": round(1 / med["faiss_b1"], 1)},
      "ms_per_batch_median": {k: round(v * 1e3, 2) for k, v in med.items()},
      "ms_per_batch_min": {k: round(min(v) * 1e3, 2) for k, v in times.items()},
      "top10_agreement_jax_vs_faiss_flat": round(statistics.mean(agree), 5),
  }
  res["ratio_jax_over_faiss_b64"] = round(res["qps"]["jax_exact_b64"]
                                          / res["qps"]["faiss_flat_b64"], 2)
  res["ratio_jax_over_faiss_b1"] = round(res["qps"]["jax_exact_b1"]
                                         / res["qps"]["faiss_flat_b1"], 2)

  # The naive JAX form materializes [64, N] scores and takes top_k over whole rows.
  xj = jnp.asarray(x)
  naive = jax.jit(lambda q, x: lax.top_k(jnp.dot(q, x.T, precision=lax.Precision.HIGHEST), K))
  jax.block_until_ready(naive(jnp.asarray(q64[0]), xj))
  t_naive = [seconds(naive, jnp.asarray(q64[r]), xj) for r in range(1, min(rounds, 3) + 1)]
  res["qps"]["jax_naive_full_top_k_b64"] = round(BATCH / statistics.median(t_naive), 1)

  # faiss tuned. faiss-cpu 1.15's default distance_compute_blas_threshold (128000) keeps
  # 64 queries off its BLAS path, which is 10x faster here at 1e6 rows: lower it (20 was
  # the default of older faiss), alone and with other BLAS block sizes.
  knobs = ("distance_compute_blas_threshold", "distance_compute_blas_query_bs",
           "distance_compute_blas_database_bs")
  defaults = {name: getattr(faiss.cvar, name) for name in knobs}
  tuned = {}
  for name, setting in (("blas_threshold_20", {knobs[0]: 20}),
                        ("blas_threshold_20_query_bs_64", {knobs[0]: 20, knobs[1]: 64}),
                        ("blas_threshold_20_database_bs_65536", {knobs[0]: 20, knobs[2]: 65536})):
    for knob, value in setting.items():
      setattr(faiss.cvar, knob, value)
    flat.search(q64[0], K)
    tuned[name] = round(BATCH / statistics.median(
        [seconds(flat.search, q64[r], K) for r in range(1, min(rounds, 3) + 1)]), 1)
    for knob, value in defaults.items():
      setattr(faiss.cvar, knob, value)
  res["faiss_defaults"] = defaults
  res["qps"]["faiss_flat_b64_tuned"] = tuned
  res["ratio_jax_over_best_tuned_faiss_b64"] = round(res["qps"]["jax_exact_b64"]
                                                     / max(tuned.values()), 2)
  threads = faiss.omp_get_max_threads()  # faiss's batch-1 scan on one OpenMP thread
  faiss.omp_set_num_threads(1)
  res["qps"]["faiss_flat_b1_one_thread"] = round(1 / statistics.median(
      [seconds(each, flat.search, q1[r], K) / singles
       for r in range(1, min(rounds, 3) + 1)]), 1)
  faiss.omp_set_num_threads(threads)
  res["load_avg"] = [before, load()]
  log(f"N={n}: {json.dumps(res['qps'])}")
  return res


def top_k_section(n: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  s = jnp.asarray(rng.standard_normal((BATCH, n), dtype=np.float32))
  fns = {"top_k_10": jax.jit(lambda s: lax.top_k(s, K)), "max": jax.jit(lambda s: s.max(1)),
         "max_of_groups_of_32": jax.jit(lambda s: s.reshape(BATCH, 32, -1).max(1))}
  out = {}
  for name, fn in fns.items():
    jax.block_until_ready(fn(s))
    out[name + "_ms"] = round(min(seconds(fn, s)
                                  for _ in range(5)) * 1e3, 2)
  hlo = jax.jit(lambda s: lax.top_k(s, K)).lower(s).compile().as_text()
  out["top_k_lowers_to"] = "TopK custom call" if 'custom_call_target="TopK"' in hlo else "sort"
  return {"scores_shape": [BATCH, n], **out}


# ---- HNSW ------------------------------------------------------------------------------------
def hnsw_section(n: int, dim: int, seed: int, queries: int = 1000) -> dict:
  rng = np.random.default_rng(seed)
  x = unit_vectors(rng, n, dim)
  q = unit_vectors(rng, queries, dim)
  truth = exact_ids(x, q, K)
  before = load()
  index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
  index.hnsw.efConstruction = 80
  t_build = seconds(index.add, x)
  log(f"HNSW N={n}: built in {t_build:.1f} s")
  rows = []
  for ef in (16, 64, 256, 1024):
    index.hnsw.efSearch = ef
    _, ids = index.search(q, K)
    recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, truth)])
    t = statistics.median(seconds(index.search, q[a:a + BATCH], K)
                          for a in range(0, 5 * BATCH, BATCH))
    rows.append({"ef_search": ef, "recall_at_10": round(float(recall), 4),
                 "qps_b64": round(BATCH / t, 1)})
    log(f"HNSW N={n} efSearch={ef}: recall@10 {recall:.4f}, {BATCH / t:.0f} q/s")
  return {"n": n, "dim": dim, "M": 32, "ef_construction": 80, "build_s": round(t_build, 1),
          "queries": queries, "by_ef_search": rows, "load_avg": [before, load()]}


# ---- embedding -------------------------------------------------------------------------------
def encoder_and_tokenizer(dtype: str):
  from configs import default
  from jaxlm import Runtime, build_model, from_pretrained, load_tokenizer
  from jaxlm.experiment import model_config
  if os.path.isdir(RAG_BERT):
    return (from_pretrained(RAG_BERT, dtype=dtype), load_tokenizer(RAG_BERT),
            f"runs/default/model (trained), compute {dtype}")
  tok = load_tokenizer(CORPUS_TOKENIZER)
  cfg = model_config(default.get_config()).replace(architectures=["BertModel"],
                                                   vocab_size=tok.vocab_size)
  return (build_model(cfg, runtime=Runtime(dtype=dtype)), tok,
          ("randomly initialized configs/default.py BERT (runs/default/model absent), "
           f"corpus WordPiece tokenizer, compute {dtype}"))


def embed_section(max_docs: int | None) -> dict:
  from jaxlm.data.sources import iter_documents
  docs = [d.text for d in iter_documents("embedded")][:max_docs]
  out = {"documents": len(docs), "runs": []}
  chunks = None
  for dtype in ("float32", "bfloat16"):
    encoder, tok, what = encoder_and_tokenizer(dtype)
    r = DenseRetriever(encoder, tok, pooling="mean", batch_size=64)
    if chunks is None:
      t = time.perf_counter()
      chunks = chunk_documents(docs, tok, r.max_tokens, 16, max_tokens=r.max_tokens)
      out.update(chunks=len(chunks), chunk_tokens=r.max_tokens, overlap_tokens=16,
                 mean_chunk_tokens=round(float(np.mean([c.num_tokens for c in chunks])), 1),
                 chunking_s=round(time.perf_counter() - t, 2))
      log(f"{len(chunks)} chunks of <= {r.max_tokens} tokens from {len(docs)} documents")
    texts = [c.text for c in chunks]
    before = load()
    t_first = seconds(r.embed, texts[:512])  # compiles every length bucket used
    t = [seconds(r.embed, texts) for _ in range(2)]
    out["runs"].append({"model": what, "dtype": dtype, "first_512_chunks_s_with_compile":
                        round(t_first, 2), "chunks_per_s": round(len(texts) / min(t), 1),
                        "seconds": [round(x, 2) for x in t], "load_avg": [before, load()]})
    log(f"embed {dtype}: {len(texts) / min(t):.0f} chunks/s")
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="100000,1000000")
  p.add_argument("--hnsw-sizes", default="100000,1000000")
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--singles", type=int, default=16, help="batch-1 queries timed a round")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--skip", default="", help="comma-separated sections to skip")
  p.add_argument("--out", default=None)
  a = p.parse_args()
  if a.quick:
    a.sizes, a.hnsw_sizes, a.rounds, a.singles = "10000,100000", "10000", 3, 4
  skip = set(filter(None, a.skip.split(",")))
  doc = {"benchmark": "retrieval", "machine": machine_info(),
         "versions": {"jax": jax.__version__, "faiss": faiss.__version__,
                      "numpy": np.__version__},
         "threads": {"faiss_omp": faiss.omp_get_max_threads(), "cpu_count": os.cpu_count()}}
  sizes = [int(float(s)) for s in a.sizes.split(",")]
  if "search" not in skip:
    doc["search"] = [search_section(n, a.dim, a.rounds, a.singles, seed=i)
                     for i, n in enumerate(sizes)]
  if "top_k" not in skip:
    doc["top_k"] = top_k_section(max(sizes), seed=7)
  if "hnsw" not in skip:
    doc["hnsw"] = [hnsw_section(int(float(n)), a.dim, seed=11)
                   for n in a.hnsw_sizes.split(",")]
  if "embed" not in skip:
    doc["embed"] = embed_section(60 if a.quick else None)
  text = json.dumps(doc, indent=2)
  print(text)
  write_json(text, a.out, out_name="retrieval.json")


if __name__ == "__main__":
  main()
