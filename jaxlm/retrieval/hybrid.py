"""Hybrid retrieval: reciprocal rank fusion (Cormack et al. 2009) of a sparse and a dense
ranking.

  r = HybridRetriever(BM25Retriever(), DenseRetriever(encoder, tokenizer)).index(texts)
  ids_QK, scores_QK = r.search(queries, k=10)

Each retriever ranks its top `depth` texts; a text scores sum over rankings of
1 / (rrf_k + rank), rank counting from 1, and a ranking it is absent from adds nothing.
Ranks, not scores, are fused: BM25 scores and cosine similarities live on unrelated
scales. Ties go to the lower id.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from jaxlm.errors import ConfigError
from jaxlm.retrieval import store as st
from jaxlm.retrieval.chunk import Chunk


def reciprocal_rank_fusion(rankings: Sequence[np.ndarray], k: int, rrf_k: float = 60.0):
  """Fused (ids [Q, k], scores [Q, k]) of rankings [Q, n_i] of ids (best first; -1 =
  none), best first, ties to the lower id; id -1 (score -inf) when fewer ids exist."""
  rankings = [np.asarray(r, np.int64) for r in rankings]
  Q = rankings[0].shape[0]
  ids_QK = np.full((Q, k), -1, np.int64)
  scores_QK = np.full((Q, k), -np.inf, np.float64)
  for q in range(Q):
    fused: dict[int, float] = {}
    for r in rankings:
      for rank, i in enumerate(r[q].tolist(), start=1):
        if i >= 0:
          fused[i] = fused.get(i, 0.0) + 1.0 / (rrf_k + rank)
    best = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    for j, (i, s) in enumerate(best):
      ids_QK[q, j], scores_QK[q, j] = i, s
  return ids_QK, scores_QK


class HybridRetriever:
  """Reciprocal rank fusion of `sparse` and `dense` (any two retrievers over the same
  texts); `depth` texts from each are fused."""

  kind = "hybrid"

  def __init__(self, sparse, dense, *, rrf_k: float = 60.0, depth: int = 100):
    if rrf_k < 0 or depth < 1:
      raise ConfigError(f"HybridRetriever: rrf_k must be >= 0 and depth >= 1, got "
                        f"{rrf_k} and {depth}")
    self.sparse, self.dense, self.rrf_k, self.depth = sparse, dense, float(rrf_k), int(depth)

  @property
  def texts(self) -> list[str] | None:
    return self.sparse.texts

  @property
  def chunks(self) -> list[Chunk] | None:
    return self.sparse.chunks

  def index(self, texts: Sequence[str | Chunk]) -> HybridRetriever:
    """Indexes `texts` in both retrievers."""
    texts = list(texts)
    st.as_texts(texts, "HybridRetriever")
    self.sparse.index(texts)
    self.dense.index(texts)
    return self

  def search(self, queries: Sequence[str], k: int):
    """(ids [Q, k], fused scores [Q, k]), best first; id -1 (score -inf) past the end."""
    queries, k = st.query_list(queries, "HybridRetriever"), st.check_k(k)
    if self.sparse.texts is None or self.dense.texts is None:
      raise ConfigError("HybridRetriever.search: nothing indexed (call index(texts) or load)")
    if len(self.sparse.texts) != len(self.dense.texts):
      raise ConfigError(f"HybridRetriever: the sparse retriever holds {len(self.sparse.texts)} "
                        f"texts, the dense one {len(self.dense.texts)}")
    depth = max(k, self.depth)
    sparse_ids, _ = self.sparse.search(queries, depth)
    dense_ids, _ = self.dense.search(queries, depth)
    ids_QK, scores_QK = reciprocal_rank_fusion([sparse_ids, dense_ids], k, self.rrf_k)
    return ids_QK, scores_QK.astype(np.float32)

  def save(self, directory: str) -> None:
    self.sparse.save(os.path.join(directory, "sparse"))
    self.dense.save(os.path.join(directory, "dense"))
    st.write_manifest(directory, self.kind, rrf_k=self.rrf_k, depth=self.depth,
                      num_texts=len(self.texts), sparse=self.sparse.kind, dense=self.dense.kind)

  @classmethod
  def load(cls, directory: str, encoder=None, tokenizer=None) -> HybridRetriever:
    """The index in `directory`; `encoder` and `tokenizer` as in DenseRetriever.load."""
    from jaxlm.retrieval.dense import DenseRetriever
    from jaxlm.retrieval.sparse import BM25Retriever
    m = st.read_manifest(directory, cls.kind)
    if (m["sparse"], m["dense"]) != (BM25Retriever.kind, DenseRetriever.kind):
      raise ConfigError(f"{directory}/{st.MANIFEST}: fuses {m['sparse']!r} and "
                        f"{m['dense']!r}; load() reads bm25 + dense")
    r = cls(BM25Retriever.load(os.path.join(directory, "sparse")),
            DenseRetriever.load(os.path.join(directory, "dense"), encoder, tokenizer),
            rrf_k=m["rrf_k"], depth=m["depth"])
    if r.sparse.texts != r.dense.texts:
      raise ConfigError(f"{directory}: the sparse and dense indexes hold different texts")
    return r
