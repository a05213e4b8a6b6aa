"""Retrieval-augmented generation: chunk documents, index them (BM25, dense, hybrid),
search, and fit prompts to the generator's context window (prompt.py).

  from jaxlm.retrieval import BM25Retriever, DenseRetriever, HybridRetriever
  dense = DenseRetriever(encoder, tokenizer, pooling="mean")   # or DenseRetriever("runs/x")
  r = HybridRetriever(BM25Retriever(), dense).index(dense.chunk(documents, 100, 20))
  ids_QK, scores_QK = r.search(questions, k=5)     # ids: positions in the indexed list
  r.save("runs/idx"); r = HybridRetriever.load("runs/idx")   # or jaxlm.retrieval.load(dir)
  Pipeline(r, generator, generator_tokenizer, Template()).answer("...")   # pipeline.py

Every retriever has index(texts), search(queries, k) -> (ids [Q, k], scores [Q, k]) best
first, save(dir), the classmethod load(dir), and `texts` (what it indexed). bm25s
(BM25Retriever) and faiss-cpu (the faiss_* dense backends) are optional dependencies.
"""

from jaxlm.retrieval.chunk import Chunk, chunk_documents
from jaxlm.retrieval.dense import DenseRetriever
from jaxlm.retrieval.hybrid import HybridRetriever, reciprocal_rank_fusion
from jaxlm.retrieval.pipeline import Answer, Pipeline
from jaxlm.retrieval.prompt import Prompt, Template, fit_prompt
from jaxlm.retrieval.sparse import BM25Retriever
from jaxlm.retrieval.store import ExactIndex, FaissIndex, read_kind

__all__ = ["Answer", "BM25Retriever", "Chunk", "DenseRetriever", "ExactIndex", "FaissIndex",
           "HybridRetriever", "Pipeline", "Prompt", "Template", "chunk_documents",
           "fit_prompt", "load", "reciprocal_rank_fusion"]

RETRIEVERS = {r.kind: r for r in (BM25Retriever, DenseRetriever, HybridRetriever)}


def load(directory: str, encoder=None, tokenizer=None):
  """Whatever retriever saved `directory` (its manifest says which); `encoder` and
  `tokenizer` as in DenseRetriever.load (a BM25 index needs neither)."""
  kind = read_kind(directory)
  if kind == BM25Retriever.kind:
    return BM25Retriever.load(directory)
  return RETRIEVERS[kind].load(directory, encoder, tokenizer)
