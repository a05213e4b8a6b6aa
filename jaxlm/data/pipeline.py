"""grain pipelines: seeded shuffle, per-example objective, batching and prefetch.

BERT examples are built from chunks of whole lines (see `TokenizedSplit.chunks`) by a
`random_map`, whose rng grain derives from the pipeline seed and the element index.
Causal-LM examples are rows of a packing plan fixed by the seed (`objectives.pack_plan`);
span-corruption (T5) examples corrupt such rows with a `random_map`.
Either way an example depends on nothing but (seed, index), so the iterator state that
grain checkpoints (a position) is enough to resume bit-for-bit.
"""

from __future__ import annotations

from typing import Any, Iterator

import grain
import numpy as np

from jaxlm.data.corpus import Corpus, TokenizedSplit
from jaxlm.data.objectives import (OBJECTIVES, SPAN, SpecialIds, bert_example, causal_example,
                                   pack_plan, raw_length_for, span_corruption_example,
                                   span_lengths, truncate_pair)
from jaxlm.errors import ConfigError


def special_ids(corpus: Corpus) -> SpecialIds:
  t = corpus.tokenizer
  t.require("pad", "cls", "sep", "mask")  # BERT inputs; a GPT-style tokenizer lacks them
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

  def _run(self, start: int, doc: int, n: int) -> list[int]:
    """Up to n tokens from token offset `start`, not past the end of document `doc`."""
    s = self.split
    end = min(start + n, int(s.line_offsets[s.doc_lines[doc + 1]]))
    return s.tokens[start:end].astype(np.int64).tolist()

  def __call__(self, row: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    doc, first, end = (int(x) for x in row)
    if "nsp" not in self.objective:
      a = self._tokens(first, end)[:self.max_seq_len - 2]
      return bert_example(a, None, 0, rng, self.sp, max_seq_len=self.max_seq_len,
                          objective=self.objective, mask_prob=self.mask_prob)
    budget = self.max_seq_len - 3
    # A: the chunk up to a random line boundary (a random token for a one-line chunk).
    # B: what follows A in its document, or, half of the time, text from another
    # document's line start; both fill the row up to the end of their document. True
    # and random B thus share one length and line-ending distribution: NSP cannot be
    # read off the padding or off where B stops.
    s = self.split
    start = int(s.line_offsets[first])
    if end - first >= 2:
      cut = int(s.line_offsets[rng.integers(first + 1, end)])
    else:
      cut = start + (int(rng.integers(1, s.line_offsets[end] - start))
                     if s.line_offsets[end] - start > 1 else 1)
    a = s.tokens[start:cut].astype(np.int64).tolist()[:budget - 1]
    is_next = int(rng.random() < 0.5)
    if is_next:
      b = self._run(cut, doc, budget - len(a))
    else:
      for _ in range(10):
        other = self.chunks[rng.integers(len(self.chunks))]
        if other[0] != doc:
          break
      b = self._run(int(s.line_offsets[other[1]]), int(other[0]), budget - len(a))
    b = b or [self.sp.sep]  # a document ending right at the cut: keep B non-empty
    a, b = truncate_pair(a, b, budget, rng)
    return bert_example(a, b, is_next, rng, self.sp, max_seq_len=self.max_seq_len,
                        objective=self.objective, mask_prob=self.mask_prob)


def end_of_document_id(tok) -> int:
  """The token that closes each packed document: eos where the tokenizer has one
  (HF decoder tokenizers), else [SEP]."""
  eod = getattr(tok, "eos_id", None)
  eod = getattr(tok, "sep_id", None) if eod is None else eod
  if eod is None:
    raise ConfigError(f"train.objective='causal': tokenizer {tok.source} has neither an "
                      "eos nor a [SEP] token to end documents with")
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


def _dataset(corpus: Corpus, split: str, data_cfg, objective: str, seed: int):
  """(source, transform, is_random): grain source and the per-example function."""
  if objective not in OBJECTIVES:
    raise ConfigError(f"train.objective must be one of {OBJECTIVES}, got {objective!r}")
  if objective in ("causal", SPAN):
    row_len = data_cfg.max_seq_len if objective == "causal" else span_shapes(data_cfg)[0]
    rows = causal_rows(corpus, split, row_len, seed)
    if len(rows) == 0:
      raise ConfigError(f"data: the {split} split has no tokens")
    if objective == SPAN:
      return grain.MapDataset.range(len(rows)), SpanRows(rows, corpus.tokenizer, data_cfg), True
    return grain.MapDataset.range(len(rows)), rows, False
  s = corpus.splits[split]
  budget = data_cfg.max_seq_len - (3 if "nsp" in objective else 2)
  chunks = s.chunks(budget)
  if len(chunks) == 0:
    raise ConfigError(f"data: the {split} split has no tokens")
  builder = BertPairs(s, chunks, special_ids(corpus), max_seq_len=data_cfg.max_seq_len,
                      objective=objective, mask_prob=data_cfg.mask_prob)
  return grain.MapDataset.source(chunks), builder, True


def _apply(ds: grain.MapDataset, fn, is_random: bool) -> grain.MapDataset:
  return ds.random_map(fn) if is_random else ds.map(fn)


def train_iterator(corpus: Corpus, data_cfg, *, objective: str, batch_size: int,
                   seed: int, process_index: int = 0,
                   process_count: int = 1) -> grain.DatasetIterator:
  """Endless shuffled batches of the train split; reshuffled (and BERT remasked) each
  epoch.

  Multi-host: process p of P yields rows [p*B/P, (p+1)*B/P) of every global batch of
  `batch_size` B, and builds only those examples; the global batches are the same as a
  single process's.
  """
  source, builder, is_random = _dataset(corpus, "train", data_cfg, objective, seed)
  ds = _apply(source.seed(seed).shuffle().repeat(None), builder, is_random)
  ds = ds.batch(batch_size // process_count, drop_remainder=True)
  if process_count > 1:
    ds = ds[process_index::process_count]
  opts = grain.ReadOptions(num_threads=data_cfg.num_threads,
                           prefetch_buffer_size=data_cfg.prefetch)
  return iter(ds.to_iter_dataset(opts))


def eval_batches(corpus: Corpus, split: str, data_cfg, *, objective: str, batch_size: int,
                 seed: int, max_batches: int | None = None) -> Iterator[dict[str, Any]]:
  """One fixed pass over a split (same masks, pairs or packing every time). The last
  batch is padded with examples whose `example_weight` is 0, so every batch has one
  shape."""
  source, builder, is_random = _dataset(corpus, split, data_cfg, objective, seed)
  ds = _apply(source.seed(seed), builder, is_random)
  n = len(ds) if max_batches is None else min(len(ds), max_batches * batch_size)
  for start in range(0, n, batch_size):
    items = [ds[i] for i in range(start, min(start + batch_size, n))]
    weights = [1.0] * len(items) + [0.0] * (batch_size - len(items))
    items += [items[0]] * (batch_size - len(items))
    batch = {k: np.stack([x[k] for x in items]) for k in items[0]}
    batch["example_weight"] = np.asarray(weights, np.float32)
    yield batch


def num_eval_examples(corpus: Corpus, split: str, data_cfg, objective: str,
                      seed: int = 0) -> int:
  return len(_dataset(corpus, split, data_cfg, objective, seed)[0])

