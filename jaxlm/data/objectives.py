"""Example builders as pure NumPy functions of (tokens, rng): BERT masking and segment
pairs, causal LM over packed documents, and T5 span corruption.

Each example is a pure function of its index (and its index's rng), so the pipeline
stays deterministic and resumable whatever the shuffling or prefetching. Which of them a
training run uses is the task's business (jaxlm/tasks/); nothing here knows objective
names.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

@dataclasses.dataclass(frozen=True)
class SpecialIds:
  pad: int
  cls: int
  sep: int
  mask: int
  special: frozenset[int]
  vocab_size: int


def max_predictions(max_seq_len: int, mask_prob: float) -> int:
  return max(1, math.ceil(mask_prob * max_seq_len))


def mask_tokens(ids_T: np.ndarray, maskable_T: np.ndarray, rng: np.random.Generator,
                sp: SpecialIds, *, mask_prob: float = 0.15, num_predictions: int):
  """BERT masking: pick ~mask_prob of maskable tokens; 80% [MASK], 10% random, 10% kept.

  Returns (input_ids_T, positions_P, labels_P, weights_P), padded to num_predictions.
  """
  candidates = np.flatnonzero(maskable_T)
  n = min(num_predictions, max(1, int(round(len(candidates) * mask_prob)))) if len(candidates) else 0
  chosen = np.sort(rng.choice(candidates, size=n, replace=False)) if n else np.zeros(0, np.int64)
  inputs = ids_T.copy()
  action = rng.random(n)
  # Random replacements never draw special tokens: they are not words.
  random_ids = rng.integers(0, sp.vocab_size - len(sp.special), size=n)
  for s in sorted(sp.special):  # map [0, V - S) onto the non-special ids
    random_ids = random_ids + (random_ids >= s)
  inputs[chosen] = np.where(action < 0.8, sp.mask, np.where(action < 0.9, random_ids,
                                                            ids_T[chosen]))
  positions = np.zeros(num_predictions, np.int32)
  labels = np.zeros(num_predictions, np.int32)
  weights = np.zeros(num_predictions, np.float32)
  positions[:n], labels[:n], weights[:n] = chosen, ids_T[chosen], 1.0
  return inputs, positions, labels, weights


def truncate_pair(a: list[int], b: list[int], max_tokens: int, rng: np.random.Generator):
  """Trims the longer segment one token at a time, from a random end (as BERT does)."""
  a, b = list(a), list(b)
  while len(a) + len(b) > max_tokens:
    longer = a if len(a) > len(b) else b
    if rng.random() < 0.5:
      del longer[0]
    else:
      longer.pop()
  return a, b


def pack_pair(a: list[int], b: list[int] | None, max_seq_len: int, sp: SpecialIds):
  """[CLS] A [SEP] (B [SEP]), padded: returns (ids_T, token_type_T, attention_mask_T)."""
  ids = [sp.cls, *a, sp.sep]
  types = [0] * len(ids)
  if b is not None:
    ids += [*b, sp.sep]
    types += [1] * (len(b) + 1)
  n = len(ids)
  assert n <= max_seq_len, (n, max_seq_len)
  pad = max_seq_len - n
  return (np.array(ids + [sp.pad] * pad, np.int32), np.array(types + [0] * pad, np.int32),
          np.array([1] * n + [0] * pad, np.int32))


def bert_example(a: list[int], b: list[int] | None, label: int, rng: np.random.Generator,
                 sp: SpecialIds, *, max_seq_len: int, mlm: bool, classify: bool,
                 mask_prob: float = 0.15, label_key: str = "nsp"):
  """One BERT pretraining example as a dict of fixed-shape arrays: MLM targets (weights 0
  unless `mlm`) and a pair label `{label_key}_label` (weight 0 unless `classify`)."""
  ids, types, attn = pack_pair(a, b, max_seq_len, sp)
  num_pred = max_predictions(max_seq_len, mask_prob)
  if mlm:
    maskable = (attn == 1) & ~np.isin(ids, np.array(sorted(sp.special)))
    inputs, pos, labels, weights = mask_tokens(ids, maskable, rng, sp, mask_prob=mask_prob,
                                               num_predictions=num_pred)
  else:
    inputs, pos = ids, np.zeros(num_pred, np.int32)
    labels, weights = np.zeros(num_pred, np.int32), np.zeros(num_pred, np.float32)
  return {
      "input_ids": inputs, "token_type_ids": types, "attention_mask": attn,
      "masked_positions": pos, "masked_ids": labels, "masked_weights": weights,
      f"{label_key}_label": np.int32(label),
      f"{label_key}_weight": np.float32(1.0 if classify else 0.0),
  }


# ---- causal LM: documents packed into rows --------------------------------------------
def pack_plan(doc_starts: np.ndarray, doc_ends: np.ndarray, max_seq_len: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Greedy packing of documents, each followed by an end-of-document token, into rows.

  Documents are taken in a random order; one longer than a row is cut into row-sized
  pieces, each a row of its own, and shorter pieces fill the open row until the next
  one does not fit. Returns (row_offsets_R1, pieces_P3): row r holds pieces
  row_offsets[r]:row_offsets[r+1], a piece being (start, end, eod) over the split's flat
  tokens, with eod = 1 when the end-of-document token follows tokens[start:end].
  """
  L = max_seq_len
  pieces: list[tuple[int, int, int]] = []
  full_rows: list[list[tuple[int, int, int]]] = []
  row_offsets, used = [0], 0
  # A long document's full pieces become rows at once; the open row keeps filling.
  for d in rng.permutation(len(doc_starts)):
    s, e = int(doc_starts[d]), int(doc_ends[d])
    n = e - s + 1  # the document and its end-of-document token
    for off in range(0, n, L):
      k = min(L, n - off)
      if k < 2:  # a lone end-of-document token has no target inside its segment
        continue
      last = off + k == n
      piece = (s + off, s + off + k - last, int(last))
      if k == L:
        full_rows.append([piece])
        continue
      if used + k > L:
        row_offsets.append(len(pieces))
        used = 0
      pieces.append(piece)
      used += k
  if used:
    row_offsets.append(len(pieces))
  for row in full_rows:
    pieces.extend(row)
    row_offsets.append(len(pieces))
  return np.asarray(row_offsets, np.int64), np.asarray(pieces, np.int64).reshape(-1, 3)


def causal_example(segments: list[np.ndarray], *, max_seq_len: int, pad: int):
  """Packs token segments (each ending in its end-of-document token, if it has one)
  into one row of fixed-shape arrays.

  `segment_ids` count documents from 1 (0 is padding) and `position_ids` restart at 0
  in each. `targets[t]` is the next token of the same segment; `loss_weights` is 1
  exactly there, so no prediction crosses a document boundary or touches padding.
  """
  ids_T = np.full(max_seq_len, pad, np.int32)
  seg_T = np.zeros(max_seq_len, np.int32)
  pos_T = np.zeros(max_seq_len, np.int32)
  t = 0
  for i, s in enumerate(segments, start=1):
    n = len(s)
    assert t + n <= max_seq_len, (t + n, max_seq_len)
    ids_T[t:t + n], seg_T[t:t + n], pos_T[t:t + n] = s, i, np.arange(n)
    t += n
  same_T = np.zeros(max_seq_len, bool)
  same_T[:-1] = (seg_T[:-1] == seg_T[1:]) & (seg_T[:-1] > 0)
  targets_T = np.where(same_T, np.roll(ids_T, -1), 0).astype(np.int32)
  return {
      "input_ids": ids_T, "attention_mask": (seg_T > 0).astype(np.int32),
      "segment_ids": seg_T, "position_ids": pos_T, "targets": targets_T,
      "loss_weights": same_T.astype(np.float32),
  }


# ---- T5 span corruption ---------------------------------------------------------------
def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator):
  """Splits num_items into num_segments positive lengths, uniformly at random."""
  cuts = np.sort(rng.choice(np.arange(1, num_items), size=num_segments - 1, replace=False))
  return np.diff(np.concatenate([[0], cuts, [num_items]]))


def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
  """(noise tokens, noise spans) for a sequence of `length` tokens, as T5 rounds them."""
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  num_spans = max(int(round(num_noise / mean_span_length)), 1)
  return num_noise, min(num_spans, num_noise, length - num_noise)


def span_lengths(raw_length: int, noise_density: float, mean_span_length: float):
  """(encoder length, decoder length) of a corrupted `raw_length`-token example, each
  with its closing end-of-sequence token: inputs keep the clean tokens and one sentinel
  per span; targets hold one sentinel per span and the span's tokens."""
  num_noise, num_spans = span_counts(raw_length, noise_density, mean_span_length)
  return raw_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def raw_length_for(encoder_len: int, noise_density: float, mean_span_length: float) -> int:
  """The longest raw token run whose corrupted inputs fit `encoder_len` tokens (T5's
  `random_spans_helper`, solved exactly by search)."""
  n = 2
  while span_lengths(n + 1, noise_density, mean_span_length)[0] <= encoder_len:
    n += 1
  return n


def random_spans_noise_mask(length: int, noise_density: float, mean_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
  """T5's noise mask: ~noise_density of the tokens in ~mean_span_length-long spans, spans
  and gaps alternating from a clean start; bool [length], True = corrupted."""
  num_noise, num_spans = span_counts(length, noise_density, mean_span_length)
  noise = _random_segmentation(num_noise, num_spans, rng)
  clean = _random_segmentation(length - num_noise, num_spans, rng)
  lengths = np.stack([clean, noise], axis=1).reshape(-1)  # clean, noise, clean, noise, ...
  return np.repeat(np.tile([False, True], num_spans), lengths)


def span_corruption_example(tokens: np.ndarray, rng: np.random.Generator, *, sentinels,
                            eos: int, pad: int, decoder_start: int, encoder_len: int,
                            decoder_len: int, noise_density: float = 0.15,
                            mean_span_length: float = 3.0):
  """One T5 example. Inputs: the tokens with each corrupted span replaced by its own
  sentinel; targets: each sentinel followed by the span it hides. Both end in eos.

  `sentinels[i]` is the id of the i-th sentinel (T5: <extra_id_i>). The decoder reads
  the targets shifted right behind `decoder_start`; `loss_weights` is 1 on real targets.
  """
  tokens = np.asarray(tokens, np.int32)
  n = len(tokens)
  noise = random_spans_noise_mask(n, noise_density, mean_span_length, rng)
  span_starts = noise & ~np.concatenate([[False], noise[:-1]])
  span_index = np.cumsum(span_starts) - 1  # which span each noise token belongs to
  if span_index[-1] >= len(sentinels):
    raise ValueError(f"{span_index[-1] + 1} noise spans but only {len(sentinels)} sentinels")
  sentinel_ids = np.asarray(sentinels, np.int32)[np.maximum(span_index, 0)]
  # Inputs: clean tokens, and a span's first token becomes its sentinel (the rest drop).
  inputs = np.where(span_starts, sentinel_ids, tokens)[~noise | span_starts]
  # Targets: the corrupted tokens, each span behind its sentinel.
  num_spans = int(span_starts.sum())
  targets = np.insert(tokens[noise], np.flatnonzero(span_starts[noise]),
                      np.asarray(sentinels[:num_spans], np.int32))
  inputs, targets = np.append(inputs, eos), np.append(targets, eos)
  assert len(inputs) <= encoder_len and len(targets) <= decoder_len, (len(inputs), len(targets))

  def padded(x, length, value=pad):
    out = np.full(length, value, np.int32)
    out[:len(x)] = x
    return out

  targets_T = padded(targets, decoder_len)
  return {
      "input_ids": padded(inputs, encoder_len),
      "attention_mask": padded(np.ones(len(inputs)), encoder_len, 0),
      "decoder_input_ids": np.concatenate([[decoder_start], targets_T[:-1]]).astype(np.int32),
      "decoder_attention_mask": padded(np.ones(len(targets)), decoder_len, 0),
      "targets": targets_T,
      "loss_weights": padded(np.ones(len(targets)), decoder_len, 0).astype(np.float32),
  }


def uncorrupt(inputs, targets, sentinels) -> list[int]:
  """The original tokens from a span-corruption (inputs, targets) pair, both without their
  eos: each sentinel in the inputs is replaced by what follows it in the targets."""
  sentinel_set = {int(s) for s in sentinels}
  spans, current = {}, None
  for t in targets:
    t = int(t)
    if t in sentinel_set:
      current = spans.setdefault(t, [])
    elif current is not None:
      current.append(t)
  out = []
  for t in inputs:
    t = int(t)
    out.extend(spans.get(t, []) if t in sentinel_set else [t])
  return out
