"""Inverse cloze task (ICT) pairs: a line of the corpus as the query, the passage it came
from, without it, as the positive (Lee, Chang & Toutanova 2019, "Latent Retrieval for
Weakly Supervised Open Domain Question Answering").

Passages are the corpus's runs of whole lines within one document
(`TokenizedSplit.chunks`, at most `max_tokens` tokens), so a retriever trained on them
indexes the same units it is evaluated on. A query is a line of at least
`min_query_tokens` tokens (speaker names and short stage directions are not queries);
a passage needs one such line and at least one other line. Lee et al. leave the line in
its passage 10% of the time so the encoder still values word overlap
(`keep_query_prob`); evaluation pairs always remove it, else the answer is a copy.

- Training (`IctPairs` as a grain random_map): a random query line per passage, drawn
  afresh each epoch from (seed, index), so a resumed run sees the same pairs.
- Evaluation (`eval_rows`): one query per passage, fixed by the seed; the same rows give
  token examples (in-batch metrics) and texts (`eval_texts`: passages for an index, lines
  for queries), so every retriever answers the same questions.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from jaxlm.data.corpus import Corpus, TokenizedSplit
from jaxlm.data.corpus import _lines as document_lines
from jaxlm.errors import ConfigError, DataError


def passage_rows(split: TokenizedSplit, max_tokens: int, min_query_tokens: int
                 ) -> np.ndarray:
  """Passages that can make an ICT pair: rows of (doc, first_line, end_line)."""
  chunks = split.chunks(max_tokens)
  lengths = np.diff(split.line_offsets)
  keep = [i for i, (_, first, end) in enumerate(chunks)
          if end - first >= 2 and (lengths[first:end] >= min_query_tokens).any()]
  return chunks[keep]


def passage_groups(split: TokenizedSplit, max_tokens: int, min_query_tokens: int,
                   group_size: int) -> np.ndarray:
  """Consecutive passages of one document in groups of `group_size` [N, G, 3] (a
  document's last group wraps round to its first passages): a batch of groups gives each
  query its neighbours in the same scene as negatives."""
  rows = passage_rows(split, max_tokens, min_query_tokens)
  starts = np.flatnonzero(np.diff(rows[:, 0], prepend=-1))
  groups = []
  for doc_rows in np.split(rows, starts[1:]):
    n = len(doc_rows)
    for a in range(0, n, group_size):
      groups.append(doc_rows[(a + np.arange(group_size)) % n])
  return np.stack(groups) if groups else np.zeros((0, group_size, 3), np.int64)


def query_lines(split: TokenizedSplit, first: int, end: int, min_query_tokens: int
                ) -> np.ndarray:
  """The lines of passage [first, end) long enough to be a query."""
  lengths = np.diff(split.line_offsets[first:end + 1])
  return first + np.flatnonzero(lengths >= min_query_tokens)


def query_rows(split: TokenizedSplit, min_query_tokens: int) -> np.ndarray:
  """Every line that can be a query, in a document of two lines or more: rows of
  (doc, line)."""
  lengths = np.diff(split.line_offsets)
  doc_of_line = np.repeat(np.arange(split.num_docs), np.diff(split.doc_lines))
  ok = (lengths >= min_query_tokens) & (np.diff(split.doc_lines)[doc_of_line] >= 2)
  lines = np.flatnonzero(ok)
  return np.stack([doc_of_line[lines], lines], axis=1).astype(np.int64)


def window(lengths: np.ndarray, doc_first: int, doc_end: int, q: int, max_tokens: int,
           rng: np.random.Generator) -> tuple[int, int]:
  """A random run of whole lines [first, end) of one document around line q, at most
  `max_tokens` tokens: a random share of the room goes before q, the rest after (and
  whatever that leaves, before again)."""
  room = max_tokens - int(lengths[q])
  before = int(rng.integers(0, max(room, 0) + 1))
  first, end, used = q, q + 1, 0
  while first > doc_first and used + lengths[first - 1] <= before:
    first -= 1
    used += int(lengths[first])
  while end < doc_end and used + lengths[end] <= room:
    used += int(lengths[end])
    end += 1
  while first > doc_first and used + lengths[first - 1] <= room:
    first -= 1
    used += int(lengths[first])
  return first, end


def eval_rows(split: TokenizedSplit, max_tokens: int, min_query_tokens: int, seed: int
              ) -> np.ndarray:
  """One query line per passage, chosen by `seed`: rows of (doc, first, end, query)."""
  rows = passage_rows(split, max_tokens, min_query_tokens)
  rng = np.random.default_rng(seed)
  queries = [rng.choice(query_lines(split, int(f), int(e), min_query_tokens))
             for _, f, e in rows]
  return np.concatenate([rows, np.asarray(queries, np.int64).reshape(-1, 1)], axis=1)


def _row(ids: list[int], cls: int, sep: int, pad: int, length: int
         ) -> tuple[np.ndarray, np.ndarray]:
  """[CLS] ids [SEP], cut and padded to `length`, with its attention mask."""
  ids = [cls, *ids[:length - 2], sep]
  out, mask = np.full(length, pad, np.int32), np.zeros(length, np.int32)
  out[:len(ids)], mask[:len(ids)] = ids, 1
  return out, mask


class IctPairs:
  """Passage row -> an ICT example: the passage (`input_ids`, `attention_mask`, the
  names the loop counts tokens by), the query (`query_input_ids`,
  `query_attention_mask`) and `passage_id` (the passage's first line: the same passage
  twice in a batch is no negative of itself).

  A row of 4 columns names its query line (evaluation: always removed); a row of 3 draws
  one with `rng` (training: kept in the passage with probability `keep_query_prob`)."""

  def __init__(self, split: TokenizedSplit, tokenizer, *, max_seq_len: int,
               query_max_len: int, min_query_tokens: int, keep_query_prob: float = 0.0):
    tokenizer.require("pad", "cls", "sep")
    self.split, self.max_seq_len, self.query_max_len = split, max_seq_len, query_max_len
    self.min_query_tokens, self.keep_query_prob = min_query_tokens, keep_query_prob
    self.specials = (tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id)

  def _tokens(self, first: int, end: int) -> list[int]:
    s = self.split
    return s.tokens[s.line_offsets[first]:s.line_offsets[end]].astype(np.int64).tolist()

  def __call__(self, row: np.ndarray, rng: np.random.Generator | None = None
               ) -> dict[str, Any]:
    keep = False
    if len(row) == 2:  # a query line: a random window of its document around it
      s, doc, q = self.split, int(row[0]), int(row[1])
      first, end = window(np.diff(s.line_offsets), int(s.doc_lines[doc]),
                          int(s.doc_lines[doc + 1]), q, self.max_seq_len - 2, rng)
      keep = bool(rng.random() < self.keep_query_prob)
    elif len(row) > 3:
      first, end, q = int(row[1]), int(row[2]), int(row[3])
    else:
      first, end = int(row[1]), int(row[2])
      q = int(rng.choice(query_lines(self.split, first, end, self.min_query_tokens)))
      keep = bool(rng.random() < self.keep_query_prob)
    query = self._tokens(q, q + 1)
    passage = (self._tokens(first, end) if keep
               else self._tokens(first, q) + self._tokens(q + 1, end))
    ids, mask = _row(passage, *self.specials, self.max_seq_len)
    q_ids, q_mask = _row(query, *self.specials, self.query_max_len)
    return {"input_ids": ids, "attention_mask": mask, "query_input_ids": q_ids,
            "query_attention_mask": q_mask,
            "passage_span": np.asarray([row[0], first, end], np.int32)}


class IctGroups:
  """A group of passage rows -> their ICT examples stacked [G, ...] (training)."""

  def __init__(self, pairs: IctPairs):
    self.pairs = pairs

  def __call__(self, group: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    rows = [self.pairs(row, rng) for row in group]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def split_lines(corpus: Corpus, split: str) -> list[str]:
  """The split's lines as text, in the order of its token file (the corpus keeps each
  document's text in `<split>.jsonl`)."""
  path = os.path.join(corpus.directory, f"{split}.jsonl")
  try:
    with open(path, encoding="utf-8") as f:
      lines = [ln for row in f if row.strip() for ln in document_lines(json.loads(row)["text"])]
  except FileNotFoundError:
    raise DataError(f"{path}: missing (the corpus keeps each split's text there)") from None
  want = len(corpus.splits[split].line_offsets) - 1
  if len(lines) != want:
    raise DataError(f"{path}: {len(lines)} lines, but the token file of the {split} split "
                    f"has {want}; prepare the corpus again")
  return lines


def eval_texts(corpus: Corpus, split: str, rows: np.ndarray) -> tuple[list[str], list[str]]:
  """(queries, passages) as text for `eval_rows`: query i's positive is passage i."""
  if len(rows) == 0:
    raise ConfigError(f"data: the {split} split has no passage with a query line")
  lines = split_lines(corpus, split)
  queries, passages = [], []
  for _, first, end, q in rows.tolist():
    queries.append(lines[q])
    passages.append("\n".join(lines[first:q] + lines[q + 1:end]))
  return queries, passages
