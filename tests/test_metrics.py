"""jaxlm.evals: on-device metrics against hand-computed numbers, SQuAD EM/F1 against the
v1.1 script's definition, ROUGE against `rouge-score` and by hand."""

from __future__ import annotations

import collections
import math
import re
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rouge_score import rouge_scorer

from jaxlm.errors import ConfigError, DataError
from jaxlm.evals import (
  Accuracy,
  ConfusionMatrix,
  Count,
  MeanLoss,
  RougeAccumulator,
  SpanMatch,
  accumulate,
  compute_all,
  exact_match,
  normalize_answer,
  rouge,
  squad_scores,
  to_host,
  token_f1,
)

# ---- classification ------------------------------------------------------------------
# 10 real examples of 3 classes, then 2 padding rows (weight 0) and one row whose label is
# the ignore index -100 (weight 1): none of the last three may count.
LABELS = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 0, -100]
PREDS = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1, 0, 1, 2]
WEIGHTS = [1.0] * 10 + [0.0, 0.0, 1.0]
# By hand, rows true, columns predicted:
#   true 0: predicted 0,0,1,2 -> [2, 1, 1]   support 4
#   true 1: predicted 1,1,0   -> [1, 2, 0]   support 3
#   true 2: predicted 2,2,1   -> [0, 1, 2]   support 3
#   predicted totals: 3, 4, 3; correct 6 of 10
HAND_MATRIX = [[2, 1, 1], [1, 2, 0], [0, 1, 2]]
# class 0: P 2/3, R 2/4, F1 2PR/(P+R) = 4/7
# class 1: P 2/4, R 2/3, F1 4/7
# class 2: P 2/3, R 2/3, F1 2/3
HAND_PER_CLASS = {"0": (2 / 3, 1 / 2, 4 / 7, 4), "1": (1 / 2, 2 / 3, 4 / 7, 3),
                  "2": (2 / 3, 2 / 3, 2 / 3, 3)}
HAND_MACRO_P = HAND_MACRO_R = (2 / 3 + 1 / 2 + 2 / 3) / 3  # 11/18
HAND_MACRO_F1 = (4 / 7 + 4 / 7 + 2 / 3) / 3  # 38/63


def _arrays(lo=0, hi=None):
  return (jnp.asarray(PREDS[lo:hi]), jnp.asarray(LABELS[lo:hi]),
          jnp.asarray(WEIGHTS[lo:hi], jnp.float32))


def test_confusion_matrix_against_hand_computed_numbers():
  cm = jax.jit(lambda p, y, w: ConfusionMatrix.from_batch(p, y, w, num_classes=3))(*_arrays())
  out = cm.compute()
  assert out["confusion_matrix"] == HAND_MATRIX
  assert out["accuracy"] == pytest.approx(0.6)
  assert out["macro_precision"] == pytest.approx(11 / 18)
  assert out["macro_recall"] == pytest.approx(HAND_MACRO_R)
  assert out["macro_f1"] == pytest.approx(38 / 63)
  assert out["macro_f1"] == pytest.approx(HAND_MACRO_F1)
  assert out["macro_precision"] == pytest.approx(HAND_MACRO_P)
  for name, (p, r, f1, support) in HAND_PER_CLASS.items():
    got = out["per_class"][name]
    assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx(
        (p, r, f1, support)), name
  named = cm.compute(class_names=["neg", "neu", "pos"])["per_class"]
  assert list(named) == ["neg", "neu", "pos"] and named["pos"]["f1"] == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="2 names for 3 classes"):
    cm.compute(class_names=["a", "b"])


def test_accuracy_matches_the_confusion_matrix_and_ignores_padding():
  acc = jax.jit(Accuracy.from_batch)(*_arrays()[:2], jnp.asarray(WEIGHTS[:12] + [0.0]))
  assert acc.compute() == {"accuracy": pytest.approx(0.6)}
  assert Count.from_batch(jnp.asarray(WEIGHTS[:12])).compute() == {"num_examples": 10.0}


def test_macro_averages_follow_sklearn_zero_division_0():
  # 4 classes: class 3 never occurs and is never predicted (left out of the macro means, as
  # sklearn's default labels do); class 2 occurs but is never predicted (P = R = F1 = 0,
  # and it counts).
  labels = jnp.asarray([0, 0, 1, 2])
  preds = jnp.asarray([0, 1, 1, 0])
  out = ConfusionMatrix.from_batch(preds, labels, num_classes=4).compute()
  # class 0: P 1/2 R 1/2 F1 1/2; class 1: P 1/2 R 1 F1 2/3; class 2: 0, 0, 0
  assert out["macro_precision"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
  assert out["macro_recall"] == pytest.approx((1 / 2 + 1 + 0) / 3)
  assert out["macro_f1"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
  assert out["per_class"]["3"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0.0}


def test_per_example_weights_broadcast_over_tokens():
  # [B, T] token predictions with [B] example weights: the second row is padding.
  pred = jnp.asarray([[1, 2], [0, 0]])
  labels = jnp.asarray([[1, 0], [1, 1]])
  w = jnp.asarray([1.0, 0.0])
  assert Accuracy.from_batch(pred, labels, w).compute()["accuracy"] == pytest.approx(0.5)
  cm = ConfusionMatrix.from_batch(pred, labels, w, num_classes=3).compute()
  assert cm["confusion_matrix"] == [[0, 0, 1], [0, 1, 0], [0, 0, 0]]


def _batch_metrics(p, y, w, losses):
  return {"n": Count.from_batch(w), "loss": MeanLoss.from_batch(losses, w),
          "acc": Accuracy.from_batch(p, y, w),
          "cm": ConfusionMatrix.from_batch(p, y, w, num_classes=3),
          "span": SpanMatch.from_batch(p, p + 1, y, y + 1, w)}


def test_merging_two_batches_equals_one_batch_under_jit():
  losses = jnp.asarray(np.random.default_rng(0).random(len(LABELS)), jnp.float32)
  step = jax.jit(_batch_metrics)
  whole = step(*_arrays(), losses)
  first, second = step(*_arrays(0, 5), losses[:5]), step(*_arrays(5), losses[5:])
  by_tree_map = jax.tree.map(jnp.add, first, second)
  by_merge = jax.jit(lambda a, b: {k: a[k].merge(b[k]) for k in a})(first, second)
  by_accumulate = accumulate(accumulate(None, first), second)
  on_host = jax.tree.map(np.add, to_host(first), to_host(second))
  for merged in (by_tree_map, by_merge, by_accumulate, on_host):
    for k in whole:
      assert type(merged[k]) is type(whole[k])
      np.testing.assert_allclose(jax.tree.leaves(merged[k]), jax.tree.leaves(whole[k]),
                                 rtol=1e-6)
  got, want = compute_all(by_merge), compute_all(whole)
  for key in ("cm_per_class", "cm_confusion_matrix"):  # exact: small integer counts
    assert got.pop(key) == want.pop(key)
  assert got == pytest.approx(want, rel=1e-6)
  assert on_host["loss"].loss_sum.dtype == np.float64


def test_accumulating_in_a_scan():
  # The functional eval loop: metrics as the carry of lax.scan, starting from empty().
  p, y, w = (jnp.asarray(PREDS[:12]).reshape(3, 4), jnp.asarray(LABELS[:12]).reshape(3, 4),
             jnp.asarray(WEIGHTS[:12]).reshape(3, 4))

  def body(acc, batch):
    return acc.merge(ConfusionMatrix.from_batch(*batch, num_classes=3)), None

  total, _ = jax.jit(lambda xs: jax.lax.scan(body, ConfusionMatrix.empty(3), xs))((p, y, w))
  assert total.compute()["confusion_matrix"] == HAND_MATRIX


def test_merge_rejects_mismatches():
  with pytest.raises(TypeError, match="Accuracy with Count"):
    Accuracy.empty().merge(Count.empty())
  with pytest.raises(ValueError, match="shapes"):
    ConfusionMatrix.empty(2).merge(ConfusionMatrix.empty(3))


def test_empty_metrics_compute_to_zero():
  assert Accuracy.empty().compute() == {"accuracy": 0.0}
  assert MeanLoss.empty().compute() == {"loss": 0.0, "perplexity": 1.0}
  assert SpanMatch.empty().compute() == {"exact_match": 0.0, "f1": 0.0}
  out = ConfusionMatrix.empty(2).compute()
  assert out["macro_f1"] == 0.0 and out["accuracy"] == 0.0


def test_perplexity_is_exp_of_the_mean_token_loss():
  rng = np.random.default_rng(1)
  losses = rng.random((4, 7)) * 6.0
  mask = (rng.random((4, 7)) < 0.7).astype(np.float32)
  mask[3] = 0.0  # a padding row
  m = jax.jit(MeanLoss.from_batch)(jnp.asarray(losses, jnp.float32), jnp.asarray(mask))
  mean = (losses * mask).sum() / mask.sum()
  out = m.compute()
  assert out["loss"] == pytest.approx(mean, rel=1e-6)
  assert out["perplexity"] == pytest.approx(math.exp(mean), rel=1e-5)
  sums = MeanLoss.from_sums((losses * mask).sum(), mask.sum()).compute()
  assert sums == pytest.approx(out, rel=1e-6)
  # A diverged model's perplexity stays finite.
  assert MeanLoss.from_sums(1e4, 1.0).compute()["perplexity"] == math.exp(50.0)


def test_span_match_by_hand():
  # pred [2,4] vs gold [2,4]: exact. pred [2,4] vs gold [3,6]: overlap 3..4 = 2 tokens,
  # lengths 3 and 4, F1 = 2*2/7. pred [5,4] (empty) vs gold [5,5]: 0. Padding row: ignored.
  ps, pe = jnp.asarray([2, 2, 5, 0]), jnp.asarray([4, 4, 4, 0])
  gs, ge = jnp.asarray([2, 3, 5, 0]), jnp.asarray([4, 6, 5, 0])
  w = jnp.asarray([1.0, 1.0, 1.0, 0.0])
  out = jax.jit(SpanMatch.from_batch)(ps, pe, gs, ge, w).compute()
  assert out["exact_match"] == pytest.approx(1 / 3)
  assert out["f1"] == pytest.approx((1 + 4 / 7 + 0) / 3)
  # Several gold spans (-1 pads): the best one counts; a row with none counts 0.
  gs2 = jnp.asarray([[9, 2], [3, -1], [5, 0], [-1, -1]])
  ge2 = jnp.asarray([[9, 4], [6, -1], [5, 0], [-1, -1]])
  out = SpanMatch.from_batch(ps, pe, gs2, ge2).compute()
  assert out["exact_match"] == pytest.approx(1 / 3)
  assert out["f1"] == pytest.approx((1 + 4 / 7 + 0) / 3)


def test_compute_all_prefixes_and_rejects_collisions():
  out = compute_all({"": Accuracy.from_batch(jnp.asarray([1]), jnp.asarray([1])),
                     "nsp": Accuracy.from_batch(jnp.asarray([1]), jnp.asarray([0]))})
  assert out == {"accuracy": 1.0, "nsp_accuracy": 0.0}
  with pytest.raises(ValueError, match="two metrics report 'macro_f1'"):
    compute_all({"": ConfusionMatrix.empty(2), "macro": SpanMatch.empty()})


# ---- SQuAD ----------------------------------------------------------------------------
# The SQuAD v1.1 evaluation script's functions, verbatim but for names, as the reference.
def _official_normalize(s):
  def remove_articles(text):
    return re.sub(r"\b(a|an|the)\b", " ", text)

  def white_space_fix(text):
    return " ".join(text.split())

  def remove_punc(text):
    exclude = set(string.punctuation)
    return "".join(ch for ch in text if ch not in exclude)

  return white_space_fix(remove_articles(remove_punc(s.lower())))


def _official_f1(prediction, ground_truth):
  prediction_tokens = _official_normalize(prediction).split()
  ground_truth_tokens = _official_normalize(ground_truth).split()
  common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
  num_same = sum(common.values())
  if num_same == 0:
    return 0
  precision = 1.0 * num_same / len(prediction_tokens)
  recall = 1.0 * num_same / len(ground_truth_tokens)
  return (2 * precision * recall) / (precision + recall)


def _official_em(prediction, ground_truth):
  return _official_normalize(prediction) == _official_normalize(ground_truth)


# (prediction, ground truth, exact match, F1), worked out by hand.
SQUAD_CASES = [
  ("The Eiffel Tower!", "eiffel tower", 1.0, 1.0),  # article, punctuation, case
  ("an apple", "Apple.", 1.0, 1.0),
  ("A banana and the Theater", "banana and theater", 1.0, 1.0),  # "the" inside a word stays
  ("U.S.", "US", 1.0, 1.0),  # punctuation removed, not turned into spaces
  ("the cat sat on the mat", "a cat on a mat", 0.0, 6 / 7),  # P 3/4, R 3/3
  ("paris paris paris", "Paris", 0.0, 1 / 2),  # bags: 1 shared, P 1/3, R 1
  ("in 1998", "the year 1998", 0.0, 1 / 2),  # P 1/2, R 1/2
  ("blue", "red", 0.0, 0.0),  # nothing shared
  ("", "", 1.0, 0.0),  # v1.1: both empty is an exact match with F1 0
  ("the", "a", 1.0, 0.0),  # both normalize to nothing
  ("something", "", 0.0, 0.0),
]


def test_normalize_answer_is_the_squad_script():
  assert normalize_answer("  Hello,   World. ") == "hello world"
  assert normalize_answer("Don't stop the music") == "dont stop music"
  for pred, gold, _, _ in SQUAD_CASES:
    assert normalize_answer(pred) == _official_normalize(pred)
    assert normalize_answer(gold) == _official_normalize(gold)


@pytest.mark.parametrize("pred,gold,em,f1", SQUAD_CASES)
def test_exact_match_and_token_f1(pred, gold, em, f1):
  assert exact_match(pred, gold) == em == float(_official_em(pred, gold))
  assert token_f1(pred, gold) == pytest.approx(f1)
  assert token_f1(pred, gold) == pytest.approx(_official_f1(pred, gold))


def test_squad_scores_take_the_best_reference():
  preds = ["Denver Broncos", "in 1998", "blue"]
  refs = [["Denver Broncos", "Broncos"], ["1998", "the year 1998"], "red"]
  # EM: 1, 0, 0. F1: 1; max(2/3 vs "1998", 1/2 vs "year 1998") = 2/3; 0.
  out = squad_scores(preds, refs)
  assert out == pytest.approx({"exact_match": 1 / 3, "f1": (1 + 2 / 3) / 3, "count": 3.0})
  assert squad_scores([], []) == {"exact_match": 0.0, "f1": 0.0, "count": 0.0}
  with pytest.raises(DataError, match="2 predictions for 1 references"):
    squad_scores(["a", "b"], ["a"])
  with pytest.raises(DataError, match="reference 0 has no answers"):
    squad_scores(["a"], [[]])


# ---- ROUGE ----------------------------------------------------------------------------
ROUGE_PAIRS = [
  ("the cat was found under the bed", "the cat was under the bed"),
  ("police killed the gunman", "the gunman was shot down by police"),
  ("Running dogs chase cats quickly.", "A dog runs after the cat."),
  ("completely unrelated words", "nothing in common here"),
]


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_rouge_matches_rouge_score(use_stemmer):
  types = ("rouge1", "rouge2", "rougeL")
  scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer)
  scores = [scorer.score(ref, pred) for pred, ref in ROUGE_PAIRS]
  want = {t: float(np.mean([s[t].fmeasure for s in scores])) for t in types}
  preds, refs = zip(*ROUGE_PAIRS)
  assert rouge(preds, refs, use_stemmer=use_stemmer) == pytest.approx(want)
  # Several references: the best F-measure per type, as rouge-score's score_multi.
  multi = [[ref, "the cat"] for ref in refs]
  scores = [scorer.score_multi(m, pred) for pred, m in zip(preds, multi)]
  want = {t: float(np.mean([s[t].fmeasure for s in scores])) for t in types}
  acc = RougeAccumulator(use_stemmer=use_stemmer)
  acc.add_batch(preds[:2], multi[:2])
  acc.add_batch(preds[2:], multi[2:])
  assert acc.compute() == pytest.approx(want)


def test_rouge_by_hand():
  # prediction: the quick brown fox; reference: the quick red.
  # ROUGE-1: 2 shared unigrams, P 2/4, R 2/3, F 4/7. ROUGE-2: bigrams {the quick, quick brown,
  # brown fox} vs {the quick, quick red}: 1 shared, P 1/3, R 1/2, F 2/5. ROUGE-L: LCS
  # "the quick" = 2, F 4/7.
  out = rouge(["the quick brown fox"], ["the quick red"], use_stemmer=False)
  assert out == pytest.approx({"rouge1": 4 / 7, "rouge2": 2 / 5, "rougeL": 4 / 7})
  # The Porter stemmer matches cats/cat and running/runs.
  assert rouge(["cats running"], ["cat runs"], ["rouge1"])["rouge1"] == pytest.approx(1.0)
  assert rouge(["cats running"], ["cat runs"], ["rouge1"], use_stemmer=False) == {
      "rouge1": 0.0}
  assert RougeAccumulator().compute() == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
  with pytest.raises(ConfigError, match="rougeX"):
    rouge(["a"], ["a"], ["rouge1", "rougeX"])
