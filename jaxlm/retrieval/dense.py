"""Dense retrieval: texts embedded by an encoder, searched by inner product.

  r = DenseRetriever(jaxlm.from_pretrained(d), jaxlm.load_tokenizer(d), pooling="mean")
  r.index(r.chunk(documents, chunk_tokens=100, overlap_tokens=20))
  ids_QK, scores_QK = r.search(["Now is the winter of our discontent"], k=5)
  r.save("runs/idx"); r = DenseRetriever.load("runs/idx")   # encoder found from the manifest

The encoder is any model `jaxlm.from_pretrained` loads whose output has a
last_hidden_state (BERT-family exports, a sentence-transformers BERT directory). A text
becomes [CLS] tokens [SEP], at most `max_length` in all (the encoder's context at most);
its embedding is the mean of the last hidden states over real tokens ("mean") or the
[CLS] state ("cls"), L2-normalized, so inner product is cosine similarity.

Embedding runs jitted in batches of `batch_size` rows with the length padded up to a
power of two (>= 16): at most log2(max_length) shapes ever compile. Texts are sorted by
length first so a batch wastes little padding. The vectors go to a store (store.py): the
exact JAX index by default, or faiss ("faiss_hnsw", "faiss_ivf", "faiss_flat").
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxlm.errors import ConfigError
from jaxlm.retrieval import store as st
from jaxlm.retrieval.chunk import Chunk, chunk_documents

POOLINGS = ("mean", "cls")
_MIN_BUCKET = 16
log = logging.getLogger(__name__)


def _body(model):
  """The part of `model` that yields hidden states: a BERT under its MLM/NSP heads."""
  return getattr(model, "bert", model)


class DenseRetriever:
  """See the module docstring. `encoder` and `tokenizer` may be directories (then the
  tokenizer defaults to the encoder's, and the index manifest records where they are).

  `store_options` go to the vector store: exact `block_rows`, `query_batch`; faiss `M`,
  `ef_construction`, `ef_search`, `nlist`, `nprobe`.
  """

  kind = "dense"

  def __init__(self, encoder, tokenizer=None, pooling: str = "mean",
               max_length: int | None = None, *, batch_size: int = 64,
               backend: str = "exact", show_progress: bool | None = None, **store_options):
    self.encoder_dir = self.tokenizer_dir = None
    if isinstance(encoder, (str, os.PathLike)):
      from jaxlm.pretrained import from_pretrained, resolve_dir
      self.encoder_dir = os.path.abspath(resolve_dir(os.fspath(encoder)))
      encoder = from_pretrained(self.encoder_dir)
      tokenizer = self.encoder_dir if tokenizer is None else tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
      from jaxlm.data.tokenizer import load_tokenizer
      self.tokenizer_dir = os.path.abspath(os.fspath(tokenizer))
      tokenizer = load_tokenizer(self.tokenizer_dir)
    if tokenizer is None:
      raise ConfigError("DenseRetriever: tokenizer is required (the encoder's tokenizer)")
    if pooling not in POOLINGS:
      raise ConfigError(f"DenseRetriever: pooling must be one of {POOLINGS}, got {pooling!r}")
    cfg = encoder.config
    context = cfg.max_position_embeddings
    max_length = context if max_length is None else max_length
    if isinstance(max_length, bool) or not isinstance(max_length, int):
      raise ConfigError(f"DenseRetriever: max_length must be an integer, got {max_length!r}")
    if max_length > context:
      raise ConfigError(f"DenseRetriever: max_length={max_length} is larger than the "
                        f"encoder's context ({context} positions)")
    if tokenizer.vocab_size > cfg.vocab_size:
      raise ConfigError(f"DenseRetriever: the tokenizer has {tokenizer.vocab_size} tokens, "
                        f"the encoder's vocabulary {cfg.vocab_size}: not its tokenizer")
    has_specials = tokenizer.cls_id is not None and tokenizer.sep_id is not None
    self.specials = ([tokenizer.cls_id], [tokenizer.sep_id]) if has_specials else ([], [])
    self.max_tokens = max_length - (2 if has_specials else 0)  # text tokens per passage
    if self.max_tokens < 1:
      raise ConfigError(f"DenseRetriever: max_length={max_length} leaves no room for text")
    if backend not in st.BACKENDS:
      raise ConfigError(f"DenseRetriever: backend must be one of {st.BACKENDS}, got {backend!r}")
    st.check_options(backend, store_options)
    self.encoder, self.tokenizer, self.pooling = encoder, tokenizer, pooling
    self.max_length, self.batch_size, self.show_progress = max_length, batch_size, show_progress
    self.backend, self.store_options = backend, store_options
    self.dim = cfg.hidden_size
    self.texts: list[str] | None = None
    self.chunks: list[Chunk] | None = None
    self.store = None
    self.num_truncated = self._last_cut = 0
    self._graphdef, self._state = nnx.split(_body(encoder))

  # ---- identity ----------------------------------------------------------------------------
  @functools.cached_property
  def encoder_info(self) -> dict:
    return {**st.encoder_fingerprint(_body(self.encoder)), "dir": self.encoder_dir}

  @functools.cached_property
  def tokenizer_info(self) -> dict:
    return {**st.tokenizer_fingerprint(self.tokenizer), "dir": self.tokenizer_dir}

  # ---- chunking and embedding --------------------------------------------------------------
  def chunk(self, docs: Sequence[str], chunk_tokens: int | None = None,
            overlap_tokens: int = 0, *, doc_ids=None) -> list[Chunk]:
    """`chunk_documents` with this retriever's tokenizer; chunks must fit the encoder."""
    return chunk_documents(docs, self.tokenizer, chunk_tokens or self.max_tokens,
                           overlap_tokens, doc_ids=doc_ids, max_tokens=self.max_tokens)

  def _token_ids(self, texts: Sequence[str]) -> tuple[list[list[int]], int]:
    """Each text as [CLS] tokens [SEP], cut to max_length; and how many were cut."""
    head, tail = self.specials
    rows = self.tokenizer.encode_batch(list(texts))
    cut = sum(len(r) > self.max_tokens for r in rows)
    return [head + r[:self.max_tokens] + tail for r in rows], cut

  def _bucket(self, length: int) -> int:
    return min(self.max_length, max(_MIN_BUCKET, 1 << (length - 1).bit_length()))

  def embed(self, texts: Sequence[str], *, show_progress: bool | None = False) -> np.ndarray:
    """L2-normalized embeddings [N, D] (float32) of `texts`."""
    ids, self._last_cut = self._token_ids(texts)
    N, B, pad = len(ids), self.batch_size, self.encoder.config.pad_token_id
    out_ND = np.zeros((N, self.dim), np.float32)
    order = np.argsort([-len(r) for r in ids], kind="stable")  # longest first
    pending = []

    def drain(bar):
      rows, v_BD = pending.pop(0)
      out_ND[rows] = np.asarray(v_BD)[:len(rows)]
      bar.update(len(rows))

    with tqdm(total=N, desc="embed", unit="chunk", disable=None if show_progress else True,
              dynamic_ncols=True) as bar:
      for a in range(0, N, B):
        rows = order[a:a + B]
        T = self._bucket(len(ids[rows[0]]))
        ids_BT = np.full((B, T), pad, np.int32)
        mask_BT = np.zeros((B, T), np.int32)
        for b, r in enumerate(rows):
          ids_BT[b, :len(ids[r])], mask_BT[b, :len(ids[r])] = ids[r], 1
        pending.append((rows, _pool(self._graphdef, self.pooling, self._state,
                                    jnp.asarray(ids_BT), jnp.asarray(mask_BT))))
        if len(pending) > 2:  # keep the device busy while the host fills the next batch
          drain(bar)
      while pending:
        drain(bar)
    return out_ND

  # ---- the retriever interface -------------------------------------------------------------
  def index(self, texts: Sequence[str | Chunk]) -> DenseRetriever:
    """Embeds and indexes `texts` (str or Chunk); their positions are the ids search
    returns."""
    texts, chunks = st.as_texts(texts, "DenseRetriever")
    show = True if self.show_progress is None else self.show_progress
    vectors_ND = self.embed(texts, show_progress=show)
    self.num_truncated = self._last_cut  # texts longer than the encoder takes
    if self.num_truncated:
      log.warning("DenseRetriever.index: %d of %d texts cut to max_length=%d tokens "
                  "(chunk them: DenseRetriever.chunk)", self.num_truncated, len(texts),
                  self.max_length)
    self.store = st.build_store(self.backend, vectors_ND, **self.store_options)
    self.texts, self.chunks = texts, chunks
    return self

  def search(self, queries: Sequence[str], k: int):
    """(ids [Q, k], scores [Q, k]), best first; id -1 (score -inf) past the last text."""
    queries = st.query_list(queries, "DenseRetriever")
    k = st.check_k(k)
    if self.store is None:
      raise ConfigError("DenseRetriever.search: nothing indexed (call index(texts) or load)")
    return self.store.search(self.embed(queries), k)

  def save(self, directory: str) -> None:
    if self.store is None:
      raise ConfigError("DenseRetriever.save: nothing indexed (call index(texts) first)")
    os.makedirs(directory, exist_ok=True)
    options = self.store.save(directory)
    st.write_texts(directory, self.texts, self.chunks)
    st.write_manifest(directory, self.kind, num_texts=len(self.texts), dim=self.dim,
                      pooling=self.pooling, max_length=self.max_length,
                      backend=self.backend, store_options=options,
                      encoder=self.encoder_info, tokenizer=self.tokenizer_info)

  @classmethod
  def load(cls, directory: str, encoder=None, tokenizer=None, *, batch_size: int = 64,
           show_progress: bool | None = None) -> DenseRetriever:
    """The index in `directory`, searched with `encoder` and `tokenizer` (default: the
    directories its manifest records); another encoder or tokenizer is an error."""
    m = st.read_manifest(directory, cls.kind)
    where = f"{directory}/{st.MANIFEST}"
    if encoder is None:
      encoder = m["encoder"].get("dir")
      if not encoder or not os.path.isdir(encoder):
        raise ConfigError(f"{where}: the encoder directory it records ({encoder}) is not "
                          "here; pass encoder= and tokenizer=")
    recorded = m["tokenizer"].get("dir")
    if tokenizer is None and recorded and os.path.exists(recorded):
      tokenizer = recorded
    r = cls(encoder, tokenizer, pooling=m["pooling"], max_length=m["max_length"],
            batch_size=batch_size, backend=m["backend"], show_progress=show_progress,
            **m["store_options"])
    st.check_fingerprint(directory, "tokenizer", m["tokenizer"], r.tokenizer_info)
    st.check_fingerprint(directory, "encoder", m["encoder"], r.encoder_info)
    r.store = st.load_store(directory, m["backend"], m["store_options"])
    r.texts, r.chunks = st.read_texts(directory)
    if not r.store.n == len(r.texts) == m["num_texts"] or r.store.dim != r.dim:
      raise ConfigError(f"{where}: {m['num_texts']} texts of dim {m['dim']}, but the files "
                        f"hold {r.store.n} vectors of dim {r.store.dim} and "
                        f"{len(r.texts)} texts")
    return r


@functools.partial(jax.jit, static_argnums=(0, 1))
def _pool(graphdef, pooling: str, state, ids_BT, mask_BT):
  """Pooled, L2-normalized float32 embeddings [B, D] of one padded batch (compiled once
  per model structure and shape, shared by every retriever)."""
  out = nnx.merge(graphdef, state)(ids_BT, attention_mask=mask_BT)
  h_BTD = getattr(out, "last_hidden_state", None)
  if h_BTD is None:
    raise ConfigError("DenseRetriever: the encoder's output has no last_hidden_state")
  return pool(h_BTD, mask_BT, pooling)


def pool(h_BTD, mask_BT, pooling: str):
  """L2-normalized float32 embeddings [B, D]: mean over real tokens, or the [CLS] state
  (the contrastive task trains through this very function)."""
  h_BTD = h_BTD.astype(jnp.float32)
  if pooling == "cls":
    v_BD = h_BTD[:, 0]
  else:
    m_BT = mask_BT.astype(jnp.float32)
    v_BD = (h_BTD * m_BT[..., None]).sum(1) / jnp.maximum(m_BT.sum(1), 1.0)[:, None]
  return v_BD / jnp.maximum(jnp.linalg.norm(v_BD, axis=-1, keepdims=True), 1e-12)
