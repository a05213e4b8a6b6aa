"""Ranking metrics of a retriever: recall@k, MRR@k and nDCG@k with binary relevance.

Pure host functions of a ranking (ids [Q, K], best first; -1 marks "no result", as the
retrievers in jaxlm.retrieval pad) and each query's relevant ids:

  m = retrieval_metrics(ids_QK, relevant)      # {"recall@1": ..., "mrr@10": ..., ...}

Definitions (binary relevance, means over queries; a query with no relevant id counts 0):
- recall@k: |relevant in the top k| / |relevant|. With one relevant id per query, as in
  the inverse cloze task, it is the hit rate (success@k).
- MRR@k: 1 / rank of the first relevant id within the top k, else 0.
- nDCG@k: sum over relevant ranks r <= k of 1 / log2(r + 1), divided by the same sum for
  an ideal ranking (min(|relevant|, k) relevant ids first): Jarvelin & Kekalainen 2002,
  as trec_eval and BEIR compute it for 0/1 judgments.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from jaxlm.errors import ConfigError

DEFAULT_RECALL_KS = (1, 5, 10)
DEFAULT_RANK_K = 10  # the cutoff of MRR and nDCG


def _relevant_sets(relevant, num_queries: int) -> list[frozenset[int]]:
  """Each query's relevant ids as a set: from [Q] ids (one per query) or Q iterables."""
  if isinstance(relevant, np.ndarray) and relevant.ndim == 1:
    sets = [frozenset((int(r),)) for r in relevant]
  else:
    sets = [frozenset(int(i) for i in (r if isinstance(r, Iterable) else (r,)))
            for r in relevant]
  if len(sets) != num_queries:
    raise ConfigError(f"relevant: {len(sets)} entries for {num_queries} ranked queries")
  return sets


def hits(ids_QK, relevant) -> tuple[np.ndarray, np.ndarray]:
  """(hit_QK: whether each ranked id is relevant, num_relevant_Q). Ids repeated in a row
  count once (at their best rank); -1 never counts."""
  ids_QK = np.asarray(ids_QK)
  if ids_QK.ndim != 2:
    raise ConfigError(f"ids: ranked ids must be [Q, K], got shape {ids_QK.shape}")
  sets = _relevant_sets(relevant, ids_QK.shape[0])
  hit_QK = np.zeros(ids_QK.shape, bool)
  for q, (row, rel) in enumerate(zip(ids_QK.tolist(), sets)):
    seen = set()
    for j, i in enumerate(row):
      if i >= 0 and i in rel and i not in seen:
        hit_QK[q, j] = True
        seen.add(i)
  return hit_QK, np.array([len(s) for s in sets], np.int64)


def _check_k(k: int, K: int, name: str) -> None:
  if k < 1 or k > K:
    raise ConfigError(f"{name}: k={k} must be in [1, {K}] (the ranking holds {K} ids)")


def recall_at_k(ids_QK, relevant, k: int) -> float:
  hit_QK, n_Q = hits(ids_QK, relevant)
  _check_k(k, hit_QK.shape[1], "recall@k")
  per_q = hit_QK[:, :k].sum(1) / np.maximum(n_Q, 1)
  return float(per_q.mean()) if len(per_q) else 0.0


def mrr_at_k(ids_QK, relevant, k: int = DEFAULT_RANK_K) -> float:
  hit_QK, _ = hits(ids_QK, relevant)
  _check_k(k, hit_QK.shape[1], "mrr@k")
  top_QK = hit_QK[:, :k]
  first_Q = top_QK.argmax(1)
  rr_Q = np.where(top_QK.any(1), 1.0 / (first_Q + 1), 0.0)
  return float(rr_Q.mean()) if len(rr_Q) else 0.0


def ndcg_at_k(ids_QK, relevant, k: int = DEFAULT_RANK_K) -> float:
  hit_QK, n_Q = hits(ids_QK, relevant)
  _check_k(k, hit_QK.shape[1], "ndcg@k")
  discount_K = 1.0 / np.log2(np.arange(2, k + 2))
  dcg_Q = (hit_QK[:, :k] * discount_K).sum(1)
  ideal_Q = np.cumsum(discount_K)[np.clip(np.minimum(n_Q, k) - 1, 0, None)]
  ndcg_Q = np.where(n_Q > 0, dcg_Q / ideal_Q, 0.0)
  return float(ndcg_Q.mean()) if len(ndcg_Q) else 0.0


def retrieval_metrics(ids_QK, relevant, *, recall_ks: Sequence[int] = DEFAULT_RECALL_KS,
                      rank_k: int = DEFAULT_RANK_K) -> dict[str, float]:
  """recall@k for each of `recall_ks`, MRR@rank_k and nDCG@rank_k of one ranking."""
  out = {f"recall@{k}": recall_at_k(ids_QK, relevant, k) for k in recall_ks}
  out[f"mrr@{rank_k}"] = mrr_at_k(ids_QK, relevant, rank_k)
  out[f"ndcg@{rank_k}"] = ndcg_at_k(ids_QK, relevant, rank_k)
  return out
