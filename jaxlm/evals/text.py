"""Text metrics that need the host: SQuAD exact match and token F1, and ROUGE.

All scores are fractions in [0, 1] (the SQuAD script and most papers print 100×).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

from jaxlm.errors import ConfigError, DataError

Reference = str | Sequence[str]  # one answer, or several acceptable ones (max over them)

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ROUGE_TYPE = re.compile(r"rouge([1-9]|L|Lsum)")


def normalize_answer(s: str) -> str:
  """The SQuAD v1.1 evaluation script's normalization: lower case, drop ASCII punctuation,
  drop the articles a/an/the, collapse whitespace (in that order)."""
  s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, ground_truth: str) -> float:
  """1.0 when the normalized strings are equal, else 0.0."""
  return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def token_f1(prediction: str, ground_truth: str) -> float:
  """F1 of the bags of normalized words (SQuAD v1.1): 0 when nothing is shared, so also
  when either side normalizes to nothing (SQuAD v2.0's script scores two empties 1)."""
  pred, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
  same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(gold)
  return 2 * precision * recall / (precision + recall)


def _answers(reference: Reference, i: int) -> list[str]:
  answers = [reference] if isinstance(reference, str) else list(reference)
  if not answers:
    raise DataError(f"reference {i} has no answers")
  return answers


def _check_lengths(predictions: Sequence[str], references: Sequence[Reference]) -> None:
  if len(predictions) != len(references):
    raise DataError(f"{len(predictions)} predictions for {len(references)} references")


def squad_scores(predictions: Sequence[str],
                 references: Sequence[Reference]) -> dict[str, float]:
  """Mean exact match and token F1, each the max over a question's acceptable answers, as
  the SQuAD v1.1 script computes them (but as fractions); plus `count`."""
  _check_lengths(predictions, references)
  em = f1 = 0.0
  for i, (pred, ref) in enumerate(zip(predictions, references)):
    answers = _answers(ref, i)
    em += max(exact_match(pred, a) for a in answers)
    f1 += max(token_f1(pred, a) for a in answers)
  n = len(predictions)
  return {"exact_match": em / n if n else 0.0, "f1": f1 / n if n else 0.0, "count": float(n)}


class RougeAccumulator:
  """Mean ROUGE F-measures over examples added one batch at a time, via `rouge-score`.

  `use_stemmer=True` (Porter stemmer) is what most summarization papers report. The
  package's default tokenizer lower-cases and keeps only [a-z0-9] runs, so text in other
  scripts needs a `tokenizer` (an object with `tokenize(text) -> list[str]`).
  """

  def __init__(self, types: Sequence[str] = ("rouge1", "rouge2", "rougeL"), *,
               use_stemmer: bool = True, tokenizer=None):
    from rouge_score import rouge_scorer  # imports nltk: only when ROUGE is asked for

    types = tuple(types)
    bad = [t for t in types if not _ROUGE_TYPE.fullmatch(t)]
    if bad or not types:
      raise ConfigError(f"ROUGE types must be rouge1..rouge9, rougeL or rougeLsum, got {bad}")
    self.types = types
    self._scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer,
                                            tokenizer=tokenizer)
    self._sums = dict.fromkeys(types, 0.0)
    self.count = 0

  def add(self, prediction: str, reference: Reference) -> None:
    """Scores one prediction; several references score as the best one per type."""
    answers = _answers(reference, self.count)
    # rouge-score takes the target first.
    scores = (self._scorer.score(answers[0], prediction) if len(answers) == 1
              else self._scorer.score_multi(answers, prediction))
    for t in self.types:
      self._sums[t] += scores[t].fmeasure
    self.count += 1

  def add_batch(self, predictions: Sequence[str], references: Sequence[Reference]) -> None:
    _check_lengths(predictions, references)
    for pred, ref in zip(predictions, references):
      self.add(pred, ref)

  def compute(self) -> dict[str, float]:
    """Mean F-measure per type (0 for no examples)."""
    return {t: self._sums[t] / self.count if self.count else 0.0 for t in self.types}


def rouge(predictions: Sequence[str], references: Sequence[Reference],
          types: Sequence[str] = ("rouge1", "rouge2", "rougeL"), *,
          use_stemmer: bool = True, tokenizer=None) -> dict[str, float]:
  """Mean ROUGE F-measure per type over prediction/reference pairs (see RougeAccumulator)."""
  acc = RougeAccumulator(types, use_stemmer=use_stemmer, tokenizer=tokenizer)
  acc.add_batch(predictions, references)
  return acc.compute()
