"""Vector stores and index files: the exact JAX inner-product index, the optional faiss
ones, and the manifest that says how an index directory was built.

  store = ExactIndex(vectors_ND)                 # or build_store("faiss_hnsw", vectors_ND)
  ids_QK, scores_QK = store.search(queries_QD, k)

`ExactIndex` never holds the [Q, N] score matrix. The index is kept as row blocks (separate
buffers). Each block is scored as one [Q, B] matmul of which only the maximum of each group
of `group` rows is kept; `top_k` over all group maxima picks k groups, which must hold the
k best rows (a row in any other group is beaten by the k group maxima above it); the
k * group rows of those groups are gathered, scored again and ranked. The result is the
exact top-k (ties aside: a near-tie may resolve differently than in another summation
order). The group maxima are the workaround for XLA:CPU's top_k, which costs about 6.5x a
max over the same [64, 1e6] scores (benchmarks/retrieval.py, `top_k`); and a max that is
the only reader of the scores lets XLA:CPU fuse it into the matmul (see `_top_groups`).

An index directory holds manifest.json (kind, sizes, and fingerprints of the encoder and
tokenizer that built it), texts.jsonl (the indexed texts, with their source document and
character offsets when they came from `chunk_documents`) and the retriever's own files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from safetensors.numpy import load_file, save_file

from jaxlm.errors import ConfigError
from jaxlm.retrieval.chunk import Chunk

FORMAT = 1
MANIFEST = "manifest.json"
TEXTS = "texts.jsonl"
VECTORS = "vectors.safetensors"
FAISS_FILE = "index.faiss"
BACKENDS = ("exact", "faiss_flat", "faiss_hnsw", "faiss_ivf")
_PROBE = "Hello, World! 12 naïve CAFÉ -- o'er"  # tokenizers that differ disagree on this


# ---- texts and manifests -------------------------------------------------------------------
def as_texts(items: Sequence[str | Chunk], who: str) -> tuple[list[str], list[Chunk] | None]:
  """The texts to index (str or Chunk), and the chunks when all of them are chunks."""
  items = list(items)
  if not items:
    raise ConfigError(f"{who}.index: empty corpus (no texts to index)")
  bad = next((x for x in items if not isinstance(x, (str, Chunk))), None)
  if bad is not None:
    raise ConfigError(f"{who}.index: texts must be str or Chunk, got {type(bad).__name__}")
  texts = [x.text if isinstance(x, Chunk) else x for x in items]
  if not any(t.strip() for t in texts):
    raise ConfigError(f"{who}.index: empty corpus ({len(texts)} texts, all blank)")
  chunks = items if all(isinstance(x, Chunk) for x in items) else None
  return texts, chunks


def query_list(queries, who: str) -> list[str]:
  """`queries` as a list of strings (a lone string is a mistake, not 1-char queries)."""
  if isinstance(queries, str) or not all(isinstance(q, str) for q in queries):
    raise ConfigError(f"{who}.search: queries must be a list of strings")
  return list(queries)


def write_texts(directory: str, texts: Sequence[str], chunks: Sequence[Chunk] | None) -> None:
  with open(os.path.join(directory, TEXTS), "w", encoding="utf-8") as f:
    for i, text in enumerate(texts):
      row = {"text": text}
      if chunks is not None:
        c = chunks[i]
        row.update(doc_id=c.doc_id, start=c.start, end=c.end, num_tokens=c.num_tokens)
      f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_texts(directory: str) -> tuple[list[str], list[Chunk] | None]:
  path = os.path.join(directory, TEXTS)
  try:
    with open(path, encoding="utf-8") as f:
      rows = [json.loads(line) for line in f if line.strip()]
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"{path}: cannot read the indexed texts ({e})") from None
  texts = [r["text"] for r in rows]
  if rows and all("doc_id" in r for r in rows):
    return texts, [Chunk(r["text"], r["doc_id"], r["start"], r["end"], r["num_tokens"])
                   for r in rows]
  return texts, None


def write_manifest(directory: str, kind: str, **fields) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as f:
    json.dump({"format": FORMAT, "kind": kind, **fields}, f, indent=2, sort_keys=True)
    f.write("\n")


def _manifest(directory: str) -> dict:
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise ConfigError(f"{directory}: not an index directory (no {MANIFEST})")
  try:
    with open(path, encoding="utf-8") as f:
      m = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"{path}: unreadable manifest ({e})") from None
  if not isinstance(m, dict):
    raise ConfigError(f"{path}: unreadable manifest (not a JSON object)")
  return m


def read_kind(directory: str) -> str:
  """Which retriever built the index in `directory` (bm25, dense or hybrid)."""
  kind = _manifest(directory).get("kind")
  if kind not in ("bm25", "dense", "hybrid"):
    raise ConfigError(f"{directory}/{MANIFEST}: unknown index kind {kind!r}")
  return kind


def read_manifest(directory: str, kind: str) -> dict:
  """The manifest of an index directory built by a `kind` retriever."""
  path = os.path.join(directory, MANIFEST)
  m = _manifest(directory)
  if m.get("kind") != kind:
    raise ConfigError(f"{path}: a {m.get('kind')!r} index, not a {kind!r} one")
  if m.get("format") != FORMAT:
    raise ConfigError(f"{path}: index format {m.get('format')!r}; this jaxlm reads {FORMAT}")
  return m


# ---- fingerprints --------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer) -> dict:
  """What identifies a tokenizer: its vocabulary, and how it encodes a probe string (which
  catches a different normalizer over the same vocabulary)."""
  h = hashlib.sha256(str(getattr(tokenizer, "kind", "")).encode())
  for i in range(tokenizer.vocab_size):
    h.update(str(tokenizer.id_to_token(i)).encode() + b"\0")
  h.update(json.dumps(list(tokenizer.encode(_PROBE))).encode())
  return {"sha256": h.hexdigest(), "vocab_size": int(tokenizer.vocab_size)}


def encoder_fingerprint(model) -> dict:
  """What identifies an encoder: its config and every parameter's bytes."""
  from jaxlm.params import flat_params
  cfg = model.config
  h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
  for name, value in sorted(flat_params(model).items()):
    h.update(name.encode() + str(value.dtype).encode() + str(value.shape).encode())
    h.update(np.ascontiguousarray(value).tobytes())
  return {"sha256": h.hexdigest(), "model_type": cfg.model_type,
          "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers}


def check_fingerprint(directory: str, what: str, recorded: dict, given: dict) -> None:
  """A one-line error when an index is opened with another encoder or tokenizer."""
  if recorded["sha256"] != given["sha256"]:
    raise ConfigError(f"{directory}/{MANIFEST}: the index was built with another {what} "
                      f"({recorded['sha256'][:12]}, given {given['sha256'][:12]}); pass the "
                      f"{what} it was built with, or index again")


# ---- the exact JAX index -------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("k", "group", "valid_last"))
def _top_groups(blocks, q_QD, *, k: int, group: int, valid_last: int):
  """Ids [Q, k] of the k groups of rows with the largest maximum score (see the module
  docstring); group j of a block of B rows holds rows j, j + B/group, j + 2B/group, ...

  Each block is a separate buffer and its scores feed nothing but the max, so XLA:CPU
  fuses matmul and max into one kernel that never writes the [Q, B] scores: 2x faster
  than a plain matmul, which a second reader of the scores (a gather, a top_k) forces.
  Slicing one stacked array instead (lax.scan, static slices) copies every block first."""
  maxima = []
  for b, x_BD in enumerate(blocks):
    B = x_BD.shape[0]
    s_QB = lax.dot_general(q_QD, x_BD, (((1,), (1,)), ((), ())),
                           precision=lax.Precision.HIGHEST)
    if b == len(blocks) - 1 and valid_last < B:  # the last block's padding never wins
      s_QB = jnp.where(jnp.arange(B) < valid_last, s_QB, -jnp.inf)
    maxima.append(s_QB.reshape(q_QD.shape[0], group, B // group).max(axis=1))
  return lax.top_k(jnp.concatenate(maxima, axis=1), k)[1]


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def _aligned_zeros(shape: tuple[int, int], align: int = 64) -> np.ndarray:
  """A zero float32 array at a 64-byte boundary: jax.device_put on CPU then makes device
  buffers that are views of it rather than copies (numpy's own are 16-byte aligned)."""
  n = shape[0] * shape[1]
  buf = np.zeros(n + align // 4, np.float32)
  start = (-buf.ctypes.data % align) // 4
  return buf[start:start + n].reshape(shape)


def pad_results(ids_QK: np.ndarray, scores_QK: np.ndarray, k: int):
  """Widen to k columns with id -1 and score -inf (fewer texts than k)."""
  Q, have = ids_QK.shape
  if have == k:
    return ids_QK, scores_QK
  return (np.concatenate([ids_QK, np.full((Q, k - have), -1, ids_QK.dtype)], 1),
          np.concatenate([scores_QK, np.full((Q, k - have), -np.inf, scores_QK.dtype)], 1))


def check_vectors(q_QD, dim: int) -> np.ndarray:
  q_QD = np.asarray(q_QD, np.float32)
  if q_QD.ndim != 2 or q_QD.shape[1] != dim:
    raise ConfigError(f"queries: expected shape [Q, {dim}], got {list(q_QD.shape)}")
  return q_QD


def check_k(k) -> int:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ConfigError(f"k must be a positive integer, got {k!r}")
  return int(k)


class ExactIndex:
  """Exact maximum-inner-product search (see the module docstring).

  `block_rows`: index rows a block (at most `max_blocks` blocks: they grow for larger
  indexes); `query_batch`: queries a call (a shorter batch is padded to a power of two, so
  few shapes ever compile); `max_group` rows share a maximum, fewer when k * max_group
  would pass `max_candidates`. The vectors live once in host memory; on CPU the device
  blocks are views of it (jax.device_put does not copy aligned arrays).
  """

  backend = "exact"

  def __init__(self, vectors_ND, *, block_rows: int = 32768, query_batch: int = 64,
               max_group: int = 32, max_candidates: int = 1024, max_blocks: int = 64):
    v = np.asarray(vectors_ND, np.float32)
    if v.ndim != 2 or v.shape[0] == 0:
      raise ConfigError(f"ExactIndex: vectors must be [N > 0, D], got {list(v.shape)}")
    if max_group < 1 or max_group & (max_group - 1):
      raise ConfigError(f"ExactIndex: max_group must be a power of two, got {max_group}")
    self.n, self.dim = v.shape
    self.query_batch, self.max_group, self.max_candidates = query_batch, max_group, max_candidates
    self.options = {"block_rows": block_rows, "query_batch": query_batch, "max_group": max_group,
                    "max_candidates": max_candidates, "max_blocks": max_blocks}
    # Every block a multiple of max_group rows; the last one padded with zero rows.
    self.B = _ceil_div(max(block_rows, _ceil_div(self.n, max_blocks)), max_group) * max_group
    nb = _ceil_div(self.n, self.B)
    self.B_last = _ceil_div(self.n - (nb - 1) * self.B, max_group) * max_group
    self.x_ND = _aligned_zeros(((nb - 1) * self.B + self.B_last, self.dim))
    self.x_ND[:self.n] = v
    self.blocks = tuple(jax.device_put(self.x_ND[a:a + self.B])
                        for a in range(0, len(self.x_ND), self.B))
    self.valid_last = self.n - (nb - 1) * self.B

  @property
  def vectors(self) -> np.ndarray:
    """The indexed vectors [N, D]."""
    return self.x_ND[:self.n]

  def _group(self, k: int) -> int:
    nb, g = len(self.blocks), self.max_group
    while g > 1 and (k * g > self.max_candidates
                     or (nb - 1) * (self.B // g) + self.B_last // g < k):
      g //= 2
    return g

  def _candidates(self, gid_QK: np.ndarray, g: int) -> np.ndarray:
    """The rows [Q, k * g] of groups `gid_QK`, ascending."""
    G, G_last, nb = self.B // g, self.B_last // g, len(self.blocks)
    b_QK = np.minimum(gid_QK // G, nb - 1)
    j_QK = gid_QK - b_QK * G
    stride_QK = np.where(b_QK == nb - 1, G_last, G)
    rows = (b_QK * self.B + j_QK)[..., None] + np.arange(g) * stride_QK[..., None]
    return np.sort(rows.reshape(len(gid_QK), -1), axis=1)

  def search(self, q_QD, k: int):
    """(ids int64 [Q, k], scores float32 [Q, k]), best first; equal scores: lower id."""
    k, q_QD = check_k(k), check_vectors(q_QD, self.dim)
    k_eff, Q = min(k, self.n), q_QD.shape[0]
    g = self._group(k_eff)
    pending = []
    for a in range(0, Q, self.query_batch):  # every batch dispatched before any is read
      q = q_QD[a:a + self.query_batch]
      size = min(self.query_batch, 1 << (len(q) - 1).bit_length())  # 1, 2, 4, ... padded
      q_pad = np.concatenate([q, np.zeros((size - len(q), self.dim), np.float32)])
      pending.append((q, _top_groups(self.blocks, jax.device_put(q_pad), k=k_eff, group=g,
                                     valid_last=self.valid_last)))
    ids_QK = np.zeros((Q, k_eff), np.int64)
    s_QK = np.zeros((Q, k_eff), np.float32)
    a = 0
    for q, gid in pending:  # the k * g candidate rows of each query, scored again
      rows_QC = self._candidates(np.asarray(gid)[:len(q)].astype(np.int64), g)
      s_QC = np.matmul(self.x_ND[rows_QC], q[:, :, None])[..., 0]
      s_QC[rows_QC >= self.n] = -np.inf
      best = np.argsort(-s_QC, axis=1, kind="stable")[:, :k_eff]
      ids_QK[a:a + len(q)] = np.take_along_axis(rows_QC, best, 1)
      s_QK[a:a + len(q)] = np.take_along_axis(s_QC, best, 1)
      a += len(q)
    return pad_results(ids_QK, s_QK, k)

  def save(self, directory: str) -> dict:
    save_file({"vectors": np.ascontiguousarray(self.vectors)},
              os.path.join(directory, VECTORS))
    return self.options

  @classmethod
  def load(cls, directory: str, options: dict) -> ExactIndex:
    path = os.path.join(directory, VECTORS)
    if not os.path.isfile(path):
      raise ConfigError(f"{directory}: index has no {VECTORS}")
    return cls(load_file(path)["vectors"], **options)


# ---- faiss (optional) ----------------------------------------------------------------------
def _faiss():
  try:
    import faiss
  except ImportError:
    raise ConfigError("backend: the faiss_* backends need faiss (pip install faiss-cpu)") from None
  return faiss


class FaissIndex:
  """faiss behind the ExactIndex interface: "faiss_flat" (exact, IndexFlatIP),
  "faiss_hnsw" (IndexHNSWFlat: `M`, `ef_construction`, `ef_search`) or "faiss_ivf"
  (IndexIVFFlat: `nlist` cells, default 4 sqrt(N), `nprobe` searched)."""

  def __init__(self, backend: str, vectors_ND=None, *, index=None, M: int = 32,
               ef_construction: int = 80, ef_search: int = 64, nlist: int | None = None,
               nprobe: int = 16):
    faiss = _faiss()
    self.backend = backend
    self.options = {"M": M, "ef_construction": ef_construction, "ef_search": ef_search,
                    "nlist": nlist, "nprobe": nprobe}
    if index is None:
      v = np.ascontiguousarray(vectors_ND, np.float32)
      if v.ndim != 2 or v.shape[0] == 0:
        raise ConfigError(f"FaissIndex: vectors must be [N > 0, D], got {list(v.shape)}")
      D = v.shape[1]
      if backend == "faiss_flat":
        index = faiss.IndexFlatIP(D)
      elif backend == "faiss_hnsw":
        index = faiss.IndexHNSWFlat(D, M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
      elif backend == "faiss_ivf":
        self.options["nlist"] = nlist = nlist or max(1, min(len(v) // 39, int(4 * len(v) ** .5)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(D), D, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(v)
      else:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
      index.add(v)
    if backend == "faiss_hnsw":
      index.hnsw.efSearch = ef_search
    elif backend == "faiss_ivf":
      index.nprobe = nprobe
    self.index, self.n, self.dim = index, index.ntotal, index.d

  def search(self, q_QD, k: int):
    k, q_QD = check_k(k), check_vectors(q_QD, self.dim)
    scores_QK, ids_QK = self.index.search(np.ascontiguousarray(q_QD), k)
    ids_QK = ids_QK.astype(np.int64)
    return ids_QK, np.where(ids_QK >= 0, scores_QK, -np.inf).astype(np.float32)

  def save(self, directory: str) -> dict:
    _faiss().write_index(self.index, os.path.join(directory, FAISS_FILE))
    return self.options

  @classmethod
  def load(cls, directory: str, backend: str, options: dict) -> FaissIndex:
    path = os.path.join(directory, FAISS_FILE)
    if not os.path.isfile(path):
      raise ConfigError(f"{directory}: index has no {FAISS_FILE}")
    return cls(backend, index=_faiss().read_index(path), **options)


_OPTIONS = {"exact": ("block_rows", "query_batch", "max_group", "max_candidates", "max_blocks"),
            "faiss": ("M", "ef_construction", "ef_search", "nlist", "nprobe")}


def check_options(backend: str, options: dict) -> None:
  """Store options the backend takes, else a one-line error naming the first other."""
  if backend not in BACKENDS:
    raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
  known = _OPTIONS["exact" if backend == "exact" else "faiss"]
  unknown = sorted(set(options) - set(known))
  if unknown:
    raise ConfigError(f"backend={backend!r} takes no option {unknown[0]!r}; it takes {known}")


def build_store(backend: str, vectors_ND, **options):
  """The vector store `backend` names, holding `vectors_ND`."""
  check_options(backend, options)
  if backend == "exact":
    return ExactIndex(vectors_ND, **options)
  return FaissIndex(backend, vectors_ND, **options)


def load_store(directory: str, backend: str, options: dict):
  if backend == "exact":
    return ExactIndex.load(directory, options)
  if backend not in BACKENDS:
    raise ConfigError(f"{directory}/{MANIFEST}: unknown backend {backend!r}")
  return FaissIndex.load(directory, backend, options)
