"""Token-budgeted chunks with overlap, cut at line and sentence boundaries.

  chunks = chunk_documents(docs, tokenizer, chunk_tokens=120, overlap_tokens=20)
  c = chunks[0]; docs[c.doc_id][c.start:c.end] == c.text    # offsets into the source

A retriever ranks passages, so a passage must fit the encoder's context and should hold
whole lines or sentences: a cut mid-sentence splits the very text a query matches. Each
document is split into units at line ends and sentence ends; consecutive units are packed
greedily up to `chunk_tokens` tokens of `tokenizer`, and the next chunk starts with the
last units of the previous one that fit in `overlap_tokens`. A unit longer than a chunk is
split at spaces (and a word longer than a chunk at characters). Every chunk's size is its
real token count (tokenizer.encode of its text), never an estimate.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Sequence

from jaxlm.errors import ConfigError

# A unit ends at a line break, or after ., ! or ? (and closing quotes or brackets) that
# whitespace follows.
_BOUNDARY = re.compile(r"\n|(?<=[.!?])[\"')\]]*(?=\s)")


@dataclasses.dataclass(frozen=True)
class Chunk:
  text: str
  doc_id: int | str  # the source document's id (its position unless doc_ids were given)
  start: int  # character offsets: source[start:end] == text
  end: int
  num_tokens: int


def _units(doc: str) -> list[tuple[int, int]]:
  """(start, end) of each non-blank line or sentence, surrounding whitespace excluded."""
  cuts = [0] + [m.end() for m in _BOUNDARY.finditer(doc)] + [len(doc)]
  out = []
  for a, b in itertools.pairwise(cuts):
    part = doc[a:b]
    lead = len(part) - len(part.lstrip())
    body = part.strip()
    if body:
      out.append((a + lead, a + lead + len(body)))
  return out


def _split_long(doc: str, span: tuple[int, int], budget: int, count) -> list[tuple[int, int]]:
  """Pieces of a span over `budget` tokens: words, and a word over budget in halves."""
  a, b = span
  words = [(a + m.start(), a + m.end()) for m in re.finditer(r"\S+", doc[a:b])]
  if len(words) > 1:
    return [p for w in words for p in _split_long(doc, w, budget, count)]
  if count(doc[a:b]) <= budget or b - a <= 1:
    return [span]
  mid = (a + b) // 2
  return _split_long(doc, (a, mid), budget, count) + _split_long(doc, (mid, b), budget, count)


def check_sizes(chunk_tokens: int, overlap_tokens: int, max_tokens: int | None = None) -> None:
  """Chunk sizes a chunker and an encoder accept, else a one-line ConfigError."""
  for name, v in (("chunk_tokens", chunk_tokens), ("overlap_tokens", overlap_tokens)):
    if isinstance(v, bool) or not isinstance(v, int):
      raise ConfigError(f"{name} must be an integer, got {v!r}")
  if chunk_tokens < 1:
    raise ConfigError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
  if not 0 <= overlap_tokens < chunk_tokens:
    raise ConfigError(f"overlap_tokens must be in [0, chunk_tokens={chunk_tokens}), "
                      f"got {overlap_tokens}")
  if max_tokens is not None and chunk_tokens > max_tokens:
    raise ConfigError(f"chunk_tokens={chunk_tokens} is larger than the encoder's context: "
                      f"{max_tokens} tokens per passage")


def chunk_documents(docs: Sequence[str], tokenizer, chunk_tokens: int = 120,
                    overlap_tokens: int = 20, *, doc_ids: Sequence[int | str] | None = None,
                    max_tokens: int | None = None) -> list[Chunk]:
  """Chunks of every document, in document order (see the module docstring).

  `max_tokens`: the most tokens the encoder takes per passage (DenseRetriever.max_tokens);
  a larger `chunk_tokens` is an error.
  """
  check_sizes(chunk_tokens, overlap_tokens, max_tokens)
  docs = list(docs)
  if doc_ids is not None and len(doc_ids) != len(docs):
    raise ConfigError(f"doc_ids: {len(doc_ids)} ids for {len(docs)} documents")
  ids = list(range(len(docs))) if doc_ids is None else list(doc_ids)
  count = lambda text: len(tokenizer.encode(text))
  out: list[Chunk] = []
  for doc, doc_id in zip(docs, ids):
    if not isinstance(doc, str):
      raise ConfigError(f"chunk_documents: document {doc_id!r} is a {type(doc).__name__}, "
                        "not a str")
    out.extend(_chunk_one(doc, doc_id, tokenizer, chunk_tokens, overlap_tokens, count))
  if not out:
    raise ConfigError(f"chunk_documents: empty corpus ({len(docs)} documents, none with text)")
  return out


def _chunk_one(doc, doc_id, tokenizer, budget, overlap, count) -> list[Chunk]:
  units = _units(doc)
  if not units:
    return []
  sizes = [len(x) for x in tokenizer.encode_batch([doc[a:b] for a, b in units])]
  spans, n = [], []
  for span, size in zip(units, sizes):  # an over-long unit becomes words (or parts of one)
    if size <= budget:
      spans.append(span)
      n.append(size)
    else:
      pieces = _split_long(doc, span, budget, count)
      spans += pieces
      n += [len(x) for x in tokenizer.encode_batch([doc[a:b] for a, b in pieces])]
  chunks, i = [], 0
  while i < len(spans):
    j, total = i, 0
    while j < len(spans) and total + n[j] <= budget:
      total += n[j]
      j += 1
    j = max(j, i + 1)
    # Token counts of units need not add up exactly (a BPE merge across a space, a
    # sentence-initial marker): the chunk's own count decides, and it shrinks to fit.
    while True:
      a, b = spans[i][0], spans[j - 1][1]
      size = count(doc[a:b])
      if size <= budget or j == i + 1:
        break
      j -= 1
    chunks.append(Chunk(doc[a:b], doc_id, a, b, size))
    if j == len(spans):
      break
    s, tail = j, 0  # the next chunk repeats the last units that fit in `overlap` tokens
    while s - 1 > i and tail + n[s - 1] <= overlap:
      s -= 1
      tail += n[s]
    i = s
  return chunks
