"""grain pipelines: seeded shuffle, per-example transform, batching and prefetch.

A task (jaxlm/tasks/) says how a split becomes examples, as `Examples`: a grain source
and a per-example function. The builders for the kinds of example we have are here:
BERT examples are built from chunks of whole lines (see `TokenizedSplit.chunks`) by a
`random_map`, whose rng grain derives from the pipeline seed and the element index
(`bert_examples`); causal-LM examples are rows of a packing plan fixed by the seed
(`objectives.pack_plan`, `causal_examples`); span-corruption (T5) examples corrupt such
rows with a `random_map` (`span_examples`). Either way an example depends on nothing but
(seed, index), so the iterator state that grain checkpoints (a position) is enough to
resume bit-for-bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import grain
import numpy as np

from jaxlm.data.corpus import Corpus, TokenizedSplit
from jaxlm.data.objectives import (SpecialIds, bert_example, causal_example, pack_plan,
                                   raw_length_for, span_corruption_example, span_lengths,
                                   truncate_pair)
from jaxlm.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Examples:
  """A split as a task reads it: a grain source and the function that turns each of its
  elements into an example (applied with `random_map` when it draws random numbers)."""

  source: grain.MapDataset
  transform: Callable
  is_random: bool


def special_ids(corpus: Corpus) -> SpecialIds:
  t = corpus.tokenizer
  t.require("pad", "cls", "sep", "mask")  # BERT inputs; a GPT-style tokenizer lacks them
  return SpecialIds(pad=t.pad_id, cls=t.cls_id, sep=t.sep_id, mask=t.mask_id,
                    special=frozenset(t.special_ids), vocab_size=t.vocab_size)


class BertPairs:
  """grain RandomMap: chunk row -> BERT example (MLM masking when `mlm`; with `pairs`, a
  segment pair [CLS] A [SEP] B [SEP] and its label, else one segment).

  The pair and its label come from `pair` (NSP here: with probability 1/2 segment B is
  the true continuation of A, otherwise text from another document); a task with
  another pair objective subclasses this and overrides it (tasks/sop.py).
  """

  label_key = "nsp"  # the example's label is `{label_key}_label`, its weight `..._weight`

  def __init__(self, split: TokenizedSplit, chunks: np.ndarray, sp: SpecialIds, *,
               max_seq_len: int, mask_prob: float, mlm: bool = True, pairs: bool = True):
    self.split, self.chunks, self.sp = split, chunks, sp
    self.max_seq_len, self.mask_prob = max_seq_len, mask_prob
    self.mlm, self.pairs = mlm, pairs

  def _example(self, a, b, label, rng) -> dict[str, Any]:
    return bert_example(a, b, label, rng, self.sp, max_seq_len=self.max_seq_len, mlm=self.mlm,
                        classify=self.pairs, mask_prob=self.mask_prob, label_key=self.label_key)

  def _tokens(self, first: int, end: int) -> list[int]:
    s = self.split
    return s.tokens[s.line_offsets[first]:s.line_offsets[end]].astype(np.int64).tolist()

  def _run(self, start: int, doc: int, n: int) -> list[int]:
    """Up to n tokens from token offset `start`, not past the end of document `doc`."""
    s = self.split
    end = min(start + n, int(s.line_offsets[s.doc_lines[doc + 1]]))
    return s.tokens[start:end].astype(np.int64).tolist()

  def __call__(self, row: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    doc, first, end = (int(x) for x in row)
    if not self.pairs:
      return self._example(self._tokens(first, end)[:self.max_seq_len - 2], None, 0, rng)
    budget = self.max_seq_len - 3
    # A: the chunk up to a random line boundary (a random token for a one-line chunk).
    s = self.split
    start = int(s.line_offsets[first])
    if end - first >= 2:
      cut = int(s.line_offsets[rng.integers(first + 1, end)])
    else:
      cut = start + (int(rng.integers(1, s.line_offsets[end] - start))
                     if s.line_offsets[end] - start > 1 else 1)
    a = s.tokens[start:cut].astype(np.int64).tolist()[:budget - 1]
    a, b, label = self.pair(a, cut, doc, budget, rng)
    a, b = truncate_pair(a, b, budget, rng)
    return self._example(a, b, label, rng)

  def pair(self, a: list[int], cut: int, doc: int, budget: int, rng: np.random.Generator):
    """NSP: (A, B, is_next). B is what follows A (token offset `cut`) in its document or,
    half of the time, text from another document's line start; both fill the row up to
    the end of their document. True and random B thus share one length and line-ending
    distribution: NSP cannot be read off the padding or off where B stops."""
    is_next = int(rng.random() < 0.5)
    if is_next:
      b = self._run(cut, doc, budget - len(a))
    else:
      for _ in range(10):
        other = self.chunks[rng.integers(len(self.chunks))]
        if other[0] != doc:
          break
      b = self._run(int(self.split.line_offsets[other[1]]), int(other[0]), budget - len(a))
    return a, b or [self.sp.sep], is_next  # a document ending at the cut: B non-empty


def bert_examples(corpus: Corpus, split: str, data_cfg, *, mlm: bool = True,
                  pairs: bool = True, builder: type[BertPairs] = BertPairs) -> Examples:
  """BERT examples of a split: chunks of whole lines, masked (`mlm`) and/or made into
  segment pairs (`pairs`) by `builder`."""
  s = corpus.splits[split]
  chunks = s.chunks(data_cfg.max_seq_len - (3 if pairs else 2))
  if len(chunks) == 0:
    raise ConfigError(f"data: the {split} split has no tokens")
  fn = builder(s, chunks, special_ids(corpus), max_seq_len=data_cfg.max_seq_len,
               mask_prob=data_cfg.mask_prob, mlm=mlm, pairs=pairs)
  return Examples(grain.MapDataset.source(chunks), fn, True)


def end_of_document_id(tok) -> int:
  """The token that closes each packed document: eos where the tokenizer has one
  (HF decoder tokenizers), else [SEP]."""
  eod = getattr(tok, "eos_id", None)
  eod = getattr(tok, "sep_id", None) if eod is None else eod
  if eod is None:
    raise ConfigError(f"data: tokenizer {tok.source} has neither an eos nor a [SEP] token "
                      "to end packed documents with")
  return int(eod)


def causal_unigram_log_probs(corpus: Corpus, vocab_size: int | None = None) -> np.ndarray:
  """Add-one smoothed unigram model of the causal targets: the training tokens plus one
  end-of-document token per document; log p(token) [V] (V: the tokenizer's, or
  `vocab_size` when the model appends ids such as span-corruption sentinels)."""
  train = corpus.splits["train"]
  counts = np.bincount(train.tokens, minlength=vocab_size or corpus.tokenizer.vocab_size
                       ).astype(np.float64)
  counts[end_of_document_id(corpus.tokenizer)] += train.num_docs
  counts += 1.0
  return np.log(counts / counts.sum())


class CausalRows:
  """grain map: packing-plan row index -> causal LM example (documents + their
  end-of-document tokens, segment ids, restarting positions, next-token targets)."""

  def __init__(self, split: TokenizedSplit, row_offsets: np.ndarray, pieces: np.ndarray, *,
               eod: int, pad: int, max_seq_len: int):
    self.split, self.row_offsets, self.pieces = split, row_offsets, pieces
    self.eod, self.pad, self.max_seq_len = eod, pad, max_seq_len

  def __len__(self) -> int:
    return len(self.row_offsets) - 1

  def __call__(self, row: int) -> dict[str, Any]:
    row = int(row)
    segments = []
    for start, end, eod in self.pieces[self.row_offsets[row]:self.row_offsets[row + 1]]:
      seg = self.split.tokens[start:end].astype(np.int32)
      segments.append(np.append(seg, np.int32(self.eod)) if eod else seg)
    return causal_example(segments, max_seq_len=self.max_seq_len, pad=self.pad)


def causal_rows(corpus: Corpus, split: str, max_seq_len: int, seed: int) -> CausalRows:
  """The packing plan of one split: documents in an order fixed by `seed`."""
  s = corpus.splits[split]
  doc_starts = s.line_offsets[s.doc_lines[:-1]]
  doc_ends = s.line_offsets[s.doc_lines[1:]]
  row_offsets, pieces = pack_plan(doc_starts, doc_ends, max_seq_len,
                                  np.random.default_rng(seed))
  tok = corpus.tokenizer
  eod = end_of_document_id(tok)
  pad = eod if getattr(tok, "pad_id", None) is None else tok.pad_id
  return CausalRows(s, row_offsets, pieces, eod=eod, pad=pad, max_seq_len=max_seq_len)


def sentinel_ids(tok, num_sentinels: int) -> list[int]:
  """Span-corruption sentinels: the tokenizer's own <extra_id_i> (T5 tokenizers), else ids
  appended past its vocabulary, <extra_id_0> last, as T5 numbers them."""
  own = [tok.token_to_id(f"<extra_id_{i}>") for i in range(num_sentinels)]
  if all(i is not None for i in own):
    return own
  return [tok.vocab_size + num_sentinels - 1 - i for i in range(num_sentinels)]


def span_model_ids(tok, num_sentinels: int) -> dict:
  """ModelConfig ids for span corruption: the vocabulary grows by the appended sentinels;
  the decoder starts from the pad id, as T5's does."""
  eod = end_of_document_id(tok)
  pad = eod if getattr(tok, "pad_id", None) is None else tok.pad_id
  extra = 0 if max(sentinel_ids(tok, num_sentinels)) < tok.vocab_size else num_sentinels
  return {"vocab_size": tok.vocab_size + extra, "pad_token_id": pad, "eos_token_id": eod,
          "decoder_start_token_id": pad}


def span_shapes(data_cfg) -> tuple[int, int, int]:
  """(raw tokens per example, encoder length, decoder length) for data.max_seq_len."""
  raw = raw_length_for(data_cfg.max_seq_len, data_cfg.noise_density,
                       data_cfg.mean_noise_span_length)
  return (raw, *span_lengths(raw, data_cfg.noise_density, data_cfg.mean_noise_span_length))


class SpanRows:
  """grain RandomMap: packing-plan row (raw tokens) -> T5 span-corruption example."""

  def __init__(self, rows: CausalRows, tok, data_cfg):
    self.rows = rows
    _, self.encoder_len, self.decoder_len = span_shapes(data_cfg)
    ids = span_model_ids(tok, data_cfg.num_sentinels)
    self.sentinels = sentinel_ids(tok, data_cfg.num_sentinels)
    self.kw = dict(eos=ids["eos_token_id"], pad=ids["pad_token_id"],
                   decoder_start=ids["decoder_start_token_id"],
                   noise_density=data_cfg.noise_density,
                   mean_span_length=data_cfg.mean_noise_span_length)

  def __call__(self, row: int, rng: np.random.Generator) -> dict[str, Any]:
    ex = self.rows(row)
    tokens = ex["input_ids"][ex["segment_ids"] > 0]
    return span_corruption_example(tokens, rng, sentinels=self.sentinels,
                                   encoder_len=self.encoder_len, decoder_len=self.decoder_len,
                                   **self.kw)


def causal_examples(corpus: Corpus, split: str, max_seq_len: int, seed: int) -> Examples:
  """Packed causal-LM rows of a split (documents in an order fixed by `seed`)."""
  rows = causal_rows(corpus, split, max_seq_len, seed)
  if len(rows) == 0:
    raise ConfigError(f"data: the {split} split has no tokens")
  return Examples(grain.MapDataset.range(len(rows)), rows, False)


def span_examples(corpus: Corpus, split: str, data_cfg, seed: int) -> Examples:
  """T5 span-corruption examples: packed rows of raw tokens, corrupted per example."""
  rows = causal_rows(corpus, split, span_shapes(data_cfg)[0], seed)
  if len(rows) == 0:
    raise ConfigError(f"data: the {split} split has no tokens")
  return Examples(grain.MapDataset.range(len(rows)), SpanRows(rows, corpus.tokenizer, data_cfg),
                  True)


def _apply(ds: grain.MapDataset, fn, is_random: bool) -> grain.MapDataset:
  return ds.random_map(fn) if is_random else ds.map(fn)


def train_iterator(examples: Examples, data_cfg, *, batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """Endless shuffled batches of the train split; reshuffled (and BERT remasked) each
  epoch.

  Multi-host: process p of P yields rows [p*B/P, (p+1)*B/P) of every global batch of
  `batch_size` B, and builds only those examples; the global batches are the same as a
  single process's.
  """
  ds = _apply(examples.source.seed(seed).shuffle().repeat(None), examples.transform,
              examples.is_random)
  ds = ds.batch(batch_size // process_count, drop_remainder=True)
  if process_count > 1:
    ds = ds[process_index::process_count]
  opts = grain.ReadOptions(num_threads=data_cfg.num_threads,
                           prefetch_buffer_size=data_cfg.prefetch)
  return iter(ds.to_iter_dataset(opts))


def eval_batches(examples: Examples, *, batch_size: int, seed: int,
                 max_batches: int | None = None) -> Iterator[dict[str, Any]]:
  """One fixed pass over a split (same masks, pairs or packing every time). The last
  batch is padded with examples whose `example_weight` is 0, so every batch has one
  shape."""
  ds = _apply(examples.source.seed(seed), examples.transform, examples.is_random)
  n = len(ds) if max_batches is None else min(len(ds), max_batches * batch_size)
  for start in range(0, n, batch_size):
    items = [ds[i] for i in range(start, min(start + batch_size, n))]
    weights = [1.0] * len(items) + [0.0] * (batch_size - len(items))
    items += [items[0]] * (batch_size - len(items))
    batch = {k: np.stack([x[k] for x in items]) for k in items[0]}
    batch["example_weight"] = np.asarray(weights, np.float32)
    yield batch
