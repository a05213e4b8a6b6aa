"""Pretraining objectives as pure NumPy functions of (tokens, rng).

Each example is a pure function of its index's rng, so the pipeline stays
deterministic and resumable whatever the shuffling or prefetching.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

OBJECTIVES = ("mlm", "nsp", "mlm+nsp")


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


def bert_example(a: list[int], b: list[int] | None, is_next: int, rng: np.random.Generator,
                 sp: SpecialIds, *, max_seq_len: int, objective: str, mask_prob: float = 0.15):
  """One BERT pretraining example as a dict of fixed-shape arrays."""
  ids, types, attn = pack_pair(a, b, max_seq_len, sp)
  num_pred = max_predictions(max_seq_len, mask_prob)
  if "mlm" in objective:
    maskable = (attn == 1) & ~np.isin(ids, np.array(sorted(sp.special)))
    inputs, pos, labels, weights = mask_tokens(ids, maskable, rng, sp, mask_prob=mask_prob,
                                               num_predictions=num_pred)
  else:
    inputs, pos = ids, np.zeros(num_pred, np.int32)
    labels, weights = np.zeros(num_pred, np.int32), np.zeros(num_pred, np.float32)
  return {
      "input_ids": inputs, "token_type_ids": types, "attention_mask": attn,
      "masked_positions": pos, "masked_ids": labels, "masked_weights": weights,
      "nsp_label": np.int32(is_next),
      "nsp_weight": np.float32(1.0 if "nsp" in objective else 0.0),
  }
