"""Retrieval quality on the test split's inverse-cloze queries (issue 17, item 6): BM25,
the main job's BERT mean-pooled (before contrastive training), the same BERT after
contrastive training (configs/retriever.py), and the hybrid of BM25 and the latter.

  python benchmarks/retrieval_eval.py --out benchmarks/results/retrieval-eval-20261205.json
  python benchmarks/retrieval_eval.py --bert runs/default --workdir runs/rag_retriever

Steps, each as the CLI runs it, and skipped when its output already exists:
  1. the main job's BERT: configs/default.py into --bert (README command (1));
  2. the retriever: configs/retriever.py from it into --workdir (--mode=train);
  3. --mode=eval on the test split: workdir/eval.json;
  4. every figure again from the two exported models with jaxlm.retrieval (checked equal
     to eval.json), plus a paired bootstrap of the recall@5 gain over the queries and two
     extra rows: the MLM encoder CLS-pooled, and the hybrid with the MLM encoder.
Prints JSON (the acceptance checks under "acceptance") and writes it with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from behaviour import _cpu  # noqa: E402  (benchmarks/behaviour.py)
from common import jaxlm_cli as cli  # noqa: E402
from common import write_json  # noqa: E402

METRICS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")
ROWS = {"bm25": "bm25_", "dense_mlm_mean": "mlm_mean_", "dense_contrastive": "",
        "hybrid": "hybrid_"}


def per_query(ids_QK: np.ndarray) -> dict[str, np.ndarray]:
  """Per-query hit@1/5/10, reciprocal rank and nDCG@10 (query i's passage is id i)."""
  hit_QK = ids_QK == np.arange(len(ids_QK))[:, None]
  rank_Q = np.where(hit_QK.any(1), hit_QK.argmax(1) + 1, 0)
  found = rank_Q > 0
  return {"recall@1": (found & (rank_Q <= 1)).astype(float),
          "recall@5": (found & (rank_Q <= 5)).astype(float),
          "recall@10": found.astype(float),
          "mrr@10": np.where(found, 1.0 / np.maximum(rank_Q, 1), 0.0),
          "ndcg@10": np.where(found, 1.0 / np.log2(rank_Q + 1.0), 0.0)}


def bootstrap_gain(a_Q: np.ndarray, b_Q: np.ndarray, n: int = 10000, seed: int = 0):
  """Mean of a - b over queries and its paired 95% bootstrap interval."""
  rng = np.random.default_rng(seed)
  d_Q = a_Q - b_Q
  means = d_Q[rng.integers(0, len(d_Q), (n, len(d_Q)))].mean(1)
  return float(d_Q.mean()), [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def recompute(bert: str, workdir: str, cfg) -> dict:
  """Every row from the exported models, independently of the training loop."""
  import jaxlm
  from jaxlm import experiment
  from jaxlm.data.corpus import load_corpus
  from jaxlm.evals.retrieval import retrieval_metrics
  from jaxlm.retrieval import BM25Retriever, DenseRetriever, HybridRetriever
  task = experiment.task_of(cfg)
  corpus = load_corpus(os.path.join(workdir, "data"))
  queries, passages = task.eval_texts(corpus, "test", cfg)
  dtype = cfg.model.dtype
  tok = jaxlm.load_tokenizer(os.path.join(workdir, "model"))
  L = cfg.data.max_seq_len

  def dense(directory, pooling):
    model = jaxlm.from_pretrained(directory, dtype=dtype)
    return DenseRetriever(model, tok, pooling=pooling, max_length=L, show_progress=False)

  t0 = time.perf_counter()
  trained = dense(os.path.join(workdir, "model"), cfg.contrastive.pooling).index(passages)
  index_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  trained_ids = trained.search(queries, 10)[0]
  search_s = time.perf_counter() - t0
  bm25 = BM25Retriever().index(passages)
  mlm = dense(os.path.join(bert, "model"), "mean").index(passages)
  ranked = {"bm25": bm25.search(queries, 10)[0], "dense_mlm_mean": mlm.search(queries, 10)[0],
            "dense_contrastive": trained_ids,
            "hybrid": HybridRetriever(bm25, trained).search(queries, 10)[0],
            "dense_mlm_cls": dense(os.path.join(bert, "model"), "cls").index(
                passages).search(queries, 10)[0],
            "hybrid_bm25_mlm_mean": HybridRetriever(bm25, mlm).search(queries, 10)[0]}
  relevant = np.arange(len(queries))
  return {"queries": len(queries), "passages": len(passages), "ranked": ranked,
          "metrics": {k: retrieval_metrics(v, relevant) for k, v in ranked.items()},
          "contrastive_index_passages_per_s": round(len(passages) / index_s, 1),
          "contrastive_search_queries_per_s": round(len(queries) / search_s, 1),
          "examples": [{"query": queries[i], "positive": passages[i][:200]} for i in range(2)]}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--bert", default="runs/default", help="main-job BERT workdir")
  p.add_argument("--workdir", default="runs/rag_retriever", help="retriever workdir")
  p.add_argument("--out", default=None, help="also write the JSON here")
  a = p.parse_args()
  bert, wd = os.path.join(ROOT, a.bert), os.path.join(ROOT, a.workdir)
  out: dict = {"machine": _cpu(), "bert_workdir": a.bert, "retriever_workdir": a.workdir}
  if not os.path.isdir(os.path.join(bert, "model")):
    out["bert_wall_seconds"] = cli(["--config=configs/default.py", f"--workdir={bert}"],
                                   bert + ".log")
  with open(os.path.join(bert, "report.json"), encoding="utf-8") as f:
    rep = json.load(f)
  out["bert"] = {k: rep.get(k) for k in ("val_mlm_perplexity", "test_mlm_perplexity",
                                         "params", "steps", "wall_seconds")}
  args = ["--config=configs/retriever.py", f"--workdir={wd}",
          f"--config.model.init_from={bert}"]
  if not os.path.isdir(os.path.join(wd, "model")):
    out["retriever_wall_seconds"] = cli(args, wd + ".log")
  out["eval_wall_seconds"] = cli([*args, "--mode=eval", "--config.eval.split=test"],
                                 wd + ".eval.log")
  with open(os.path.join(wd, "report.json"), encoding="utf-8") as f:
    rep = json.load(f)
  with open(os.path.join(wd, "eval.json"), encoding="utf-8") as f:
    ev = json.load(f)
  with open(os.path.join(wd, "experiment.json"), encoding="utf-8") as f:
    exp = json.load(f)
  out["retriever_training"] = {
      "command": "python -m jaxlm.main " + " ".join(args).replace(ROOT + "/", ""),
      "steps": rep["steps"], "best_step": ev.get("step"), "train_seconds": rep["train_seconds"],
      "wall_seconds": rep["wall_seconds"], "contrastive": exp.get("contrastive"),
      "train": {k: exp["train"][k] for k in ("batch_size", "learning_rate", "steps",
                                             "warmup_steps", "early_stopping_metric")},
      "validation": {name: {m: rep.get(f"val_{pre}{m}") for m in METRICS}
                     for name, pre in ROWS.items()}}
  out["test_eval_json"] = {name: {m: ev[f"test_{pre}{m}"] for m in METRICS}
                           for name, pre in ROWS.items()}
  out["test_eval_json"]["in_batch_accuracy"] = ev["test_in_batch_accuracy"]

  from jaxlm import experiment
  from configs import retriever
  cfg = retriever.get_config()
  cfg.model.init_from = bert
  for section in ("contrastive",):
    cfg[section].update(exp[section])
  experiment.validate(cfg)
  again = recompute(bert, wd, cfg)
  out["test"] = again["metrics"]
  out["test_queries"], out["test_passages"] = again["queries"], again["passages"]
  out["recomputed_equals_eval_json"] = all(
      abs(again["metrics"][name][m] - out["test_eval_json"][name][m]) < 1e-9
      for name in ROWS for m in METRICS)
  q = {k: per_query(v) for k, v in again["ranked"].items()}
  gain, ci = bootstrap_gain(q["dense_contrastive"]["recall@5"], q["dense_mlm_mean"]["recall@5"])
  hy, hy_ci = bootstrap_gain(q["hybrid"]["recall@10"], q["bm25"]["recall@10"])
  t = out["test"]
  out["acceptance"] = {
      "recall@5_gain_contrastive_over_mlm_mean_points": round(100 * gain, 2),
      "recall@5_gain_95ci_points": [round(100 * x, 2) for x in ci],
      "contrastive_beats_mlm_mean_by_10_points_recall@5": 100 * gain >= 10.0,
      "hybrid_minus_bm25_recall@10_points": round(100 * hy, 2),
      "hybrid_minus_bm25_recall@10_95ci_points": [round(100 * x, 2) for x in hy_ci],
      "hybrid_at_least_bm25_recall@10": t["hybrid"]["recall@10"] >= t["bm25"]["recall@10"]}
  out["speed"] = {k: again[k] for k in ("contrastive_index_passages_per_s",
                                        "contrastive_search_queries_per_s")}
  out["examples"] = again["examples"]
  text = json.dumps(out, indent=2)
  print(text)
  write_json(text, a.out, out_name="retrieval-eval.json")


if __name__ == "__main__":
  main()
