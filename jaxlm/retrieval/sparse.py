"""BM25 retrieval through `bm25s` (sparse term-weight matrices; no hand-written scoring).

  r = BM25Retriever().index(texts)
  ids_QK, scores_QK = r.search(["winter of our discontent"], k=5)
  r.save("runs/bm25"); r = BM25Retriever.load("runs/bm25")

Texts are split into lowercased word tokens by bm25s's tokenizer (words of two or more
letters or digits), with no stopword list by default: a quote such as "to be or not to
be" is made of nothing else. Ties (e.g. texts sharing no term with the query, score 0)
go to the lower id.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from jaxlm.errors import ConfigError
from jaxlm.retrieval import store as st
from jaxlm.retrieval.chunk import Chunk

BM25_DIR = "bm25"


def _bm25s():
  try:
    import bm25s
  except ImportError:
    raise ConfigError("BM25Retriever needs bm25s (pip install bm25s)") from None
  return bm25s


class BM25Retriever:
  """Okapi BM25 (`method` "lucene", "robertson", "atire", "bm25l" or "bm25+" as bm25s
  names them) with parameters `k1` and `b`; `stopwords` is None, "en" or a list."""

  kind = "bm25"

  def __init__(self, *, k1: float = 1.5, b: float = 0.75, method: str = "lucene",
               stopwords: str | list[str] | None = None, lower: bool = True):
    if isinstance(stopwords, (list, tuple)):
      stopwords = list(stopwords)
    self.params = {"k1": float(k1), "b": float(b), "method": method, "stopwords": stopwords,
                   "lower": bool(lower)}
    self.bm25 = None
    self.texts: list[str] | None = None
    self.chunks: list[Chunk] | None = None

  def _tokenize(self, texts: Sequence[str], ids: bool):
    p = self.params
    return _bm25s().tokenize(list(texts), lower=p["lower"], stopwords=p["stopwords"] or [],
                             return_ids=ids, show_progress=False)

  def index(self, texts: Sequence[str | Chunk]) -> BM25Retriever:
    """Indexes `texts` (str or Chunk); their positions are the ids search returns."""
    texts, chunks = st.as_texts(texts, "BM25Retriever")
    p = self.params
    self.bm25 = _bm25s().BM25(k1=p["k1"], b=p["b"], method=p["method"])
    self.bm25.index(self._tokenize(texts, ids=True), show_progress=False)
    self.texts, self.chunks = texts, chunks
    return self

  def search(self, queries: Sequence[str], k: int):
    """(ids [Q, k], scores [Q, k]), best first; id -1 (score -inf) past the last text."""
    queries = st.query_list(queries, "BM25Retriever")
    k = st.check_k(k)
    if self.bm25 is None:
      raise ConfigError("BM25Retriever.search: nothing indexed (call index(texts) or load)")
    k_eff = min(k, len(self.texts))
    if not queries:
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    ids_QK, scores_QK = self.bm25.retrieve(self._tokenize(queries, ids=False), k=k_eff,
                                           show_progress=False, backend_selection="jax")
    return st.pad_results(np.asarray(ids_QK, np.int64), np.asarray(scores_QK, np.float32), k)

  def save(self, directory: str) -> None:
    if self.bm25 is None:
      raise ConfigError("BM25Retriever.save: nothing indexed (call index(texts) first)")
    os.makedirs(directory, exist_ok=True)
    self.bm25.save(os.path.join(directory, BM25_DIR), show_progress=False)
    st.write_texts(directory, self.texts, self.chunks)
    st.write_manifest(directory, self.kind, num_texts=len(self.texts), params=self.params,
                      bm25s_version=_bm25s().__version__)

  @classmethod
  def load(cls, directory: str) -> BM25Retriever:
    m = st.read_manifest(directory, cls.kind)
    r = cls(**m["params"])
    path = os.path.join(directory, BM25_DIR)
    if not os.path.isdir(path):
      raise ConfigError(f"{directory}: BM25 index has no {BM25_DIR}/ directory")
    r.bm25 = _bm25s().BM25.load(path, allow_pickle=False, show_progress=False, verbosity=0)
    r.texts, r.chunks = st.read_texts(directory)
    if not len(r.texts) == m["num_texts"] == r.bm25.scores["num_docs"]:
      raise ConfigError(f"{directory}/{st.MANIFEST}: {m['num_texts']} texts, but the files "
                        f"hold {len(r.texts)} texts and {r.bm25.scores['num_docs']} documents")
    return r
