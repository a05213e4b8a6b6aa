"""grain pipelines: seeded shuffle, per-example objective, batching and prefetch.

Examples are built from chunks of whole lines (see `TokenizedSplit.chunks`) by a
`random_map`, whose rng grain derives from the pipeline seed and the element index:
an example depends on nothing but (seed, index), so the iterator state that grain
checkpoints (a position) is enough to resume bit-for-bit.
"""

from __future__ import annotations

from typing import Any, Iterator

import grain
import numpy as np

from jaxlm.data.corpus import Corpus, TokenizedSplit
from jaxlm.data.objectives import OBJECTIVES, SpecialIds, bert_example, truncate_pair
from jaxlm.errors import ConfigError


def special_ids(corpus: Corpus) -> SpecialIds:
  t = corpus.tokenizer
  return SpecialIds(pad=t.pad_id, cls=t.cls_id, sep=t.sep_id, mask=t.mask_id,
                    special=frozenset(t.special_ids), vocab_size=t.vocab_size)


class BertPairs:
  """grain RandomMap: chunk row -> BERT example (NSP pair + MLM masking).

  With probability 1/2 (when the chunk has two or more lines) segment B is the true
  continuation of A inside the chunk; otherwise B is taken from another document.
  """

  def __init__(self, split: TokenizedSplit, chunks: np.ndarray, sp: SpecialIds, *,
               max_seq_len: int, objective: str, mask_prob: float):
    self.split, self.chunks, self.sp = split, chunks, sp
    self.max_seq_len, self.objective, self.mask_prob = max_seq_len, objective, mask_prob

  def _tokens(self, first: int, end: int) -> list[int]:
    s = self.split
    return s.tokens[s.line_offsets[first]:s.line_offsets[end]].astype(np.int64).tolist()

  def _random_segment(self, doc: int, budget: int, rng) -> list[int]:
    for _ in range(10):
      other = self.chunks[rng.integers(len(self.chunks))]
      if other[0] != doc:
        break
    d, first, _ = other
    out: list[int] = []
    for i in range(first, self.split.doc_lines[d + 1]):  # may run past its chunk
      out.extend(self.split.line(i).tolist())
      if len(out) >= budget:
        break
    return out[:budget]

  def __call__(self, row: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    doc, first, end = (int(x) for x in row)
    if "nsp" not in self.objective:
      a = self._tokens(first, end)[:self.max_seq_len - 2]
      return bert_example(a, None, 0, rng, self.sp, max_seq_len=self.max_seq_len,
                          objective=self.objective, mask_prob=self.mask_prob)
    budget = self.max_seq_len - 3
    if end - first >= 2 and rng.random() < 0.5:
      k = int(rng.integers(first + 1, end))
      a, b, is_next = self._tokens(first, k), self._tokens(k, end), 1
    else:
      k = int(rng.integers(first + 1, end + 1)) if end - first >= 2 else end
      a = self._tokens(first, k)
      b = self._random_segment(doc, max(1, budget - len(a)), rng)
      is_next = 0
    a, b = truncate_pair(a, b, budget, rng)
    return bert_example(a, b, is_next, rng, self.sp, max_seq_len=self.max_seq_len,
                        objective=self.objective, mask_prob=self.mask_prob)


def _dataset(corpus: Corpus, split: str, data_cfg, objective: str):
  if objective not in OBJECTIVES:
    raise ConfigError(f"train.objective must be one of {OBJECTIVES}, got {objective!r}")
  s = corpus.splits[split]
  budget = data_cfg.max_seq_len - (3 if "nsp" in objective else 2)
  chunks = s.chunks(budget)
  if len(chunks) == 0:
    raise ConfigError(f"data: the {split} split has no tokens")
  builder = BertPairs(s, chunks, special_ids(corpus), max_seq_len=data_cfg.max_seq_len,
                      objective=objective, mask_prob=data_cfg.mask_prob)
  return grain.MapDataset.source(chunks), builder


def train_iterator(corpus: Corpus, data_cfg, *, objective: str, batch_size: int,
                   seed: int) -> grain.DatasetIterator:
  """Endless shuffled batches of the train split; reshuffled and remasked each epoch."""
  source, builder = _dataset(corpus, "train", data_cfg, objective)
  ds = (source.seed(seed).shuffle().repeat(None).random_map(builder)
        .batch(batch_size, drop_remainder=True))
  opts = grain.ReadOptions(num_threads=data_cfg.num_threads,
                           prefetch_buffer_size=data_cfg.prefetch)
  return iter(ds.to_iter_dataset(opts))


def eval_batches(corpus: Corpus, split: str, data_cfg, *, objective: str, batch_size: int,
                 seed: int, max_batches: int | None = None) -> Iterator[dict[str, Any]]:
  """One fixed pass over a split (same masks and pairs every time). The last batch is
  padded with examples whose `example_weight` is 0, so every batch has one shape."""
  source, builder = _dataset(corpus, split, data_cfg, objective)
  ds = source.seed(seed).random_map(builder)
  n = len(ds) if max_batches is None else min(len(ds), max_batches * batch_size)
  for start in range(0, n, batch_size):
    items = [ds[i] for i in range(start, min(start + batch_size, n))]
    weights = [1.0] * len(items) + [0.0] * (batch_size - len(items))
    items += [items[0]] * (batch_size - len(items))
    batch = {k: np.stack([x[k] for x in items]) for k in items[0]}
    batch["example_weight"] = np.asarray(weights, np.float32)
    yield batch


def num_eval_examples(corpus: Corpus, split: str, data_cfg, objective: str) -> int:
  return len(_dataset(corpus, split, data_cfg, objective)[0])

