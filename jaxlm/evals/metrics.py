"""On-device metrics: small frozen pytrees of sums that add up across batches.

Each metric is built from one batch inside jit (`Accuracy.from_batch(pred_B, labels_B,
weights_B)`), merged with the next batch's on device (`a.merge(b)`, or
`jax.tree.map(jnp.add, a, b)` on a whole dict of them), and turned into numbers once, on the
host, by `compute()`. Nothing forces a host sync per batch.

Why not `flax.nnx.metrics` or `clu`: nnx metrics are stateful modules updated in place, and
our eval step is a pure jitted function whose outputs must be sums that merge across batches
(and gradient-accumulation microbatches) by plain addition; nnx has no precision/recall/F1 or
confusion matrix either. clu's metrics are close in spirit but bring a TensorFlow-era
dependency for a few dozen lines.

Conventions:
- `weights` (default all ones) are per-row weights; 0 for the rows that pad the last eval
  batch. Weights of fewer dimensions than the predictions (per-example weights [B] for
  per-token [B, T] values) are broadcast over the trailing axes.
- Sums are float32 so weights may be fractional. Counts are exact up to 2**24; beyond that
  each merge rounds by ~1e-7 relative. For very large evaluations, merge on the host in
  float64: `jax.tree.map(np.add, to_host(a), to_host(b))`.
- Empty metrics (all weights 0) compute to 0, never NaN, so metrics.jsonl stays valid JSON.
"""

from __future__ import annotations

import abc

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# exp() of a mean loss above this reports exp(MAX_LOG_PERPLEXITY): a diverged model's
# perplexity stays a finite float (as in jaxlm.tasks.base.token_metrics).
MAX_LOG_PERPLEXITY = 50.0


def _weights(weights, like):
  """float32 weights shaped like `like`: ones if None, trailing axes added if fewer."""
  like = jnp.asarray(like)
  if weights is None:
    return jnp.ones(like.shape, jnp.float32)
  w = jnp.asarray(weights, jnp.float32)
  w = w.reshape(w.shape + (1,) * (like.ndim - w.ndim))
  return jnp.broadcast_to(w, like.shape)


def _host(x) -> np.ndarray:
  return np.asarray(jax.device_get(x), np.float64)


def _div(num: float, den: float) -> float:
  """num / den, or 0 when den is 0 (sklearn's zero_division=0)."""
  return float(num / den) if den != 0 else 0.0


class Metric(abc.ABC):
  """Shared behaviour; subclasses are `flax.struct.dataclass`es whose fields are sums."""

  def merge(self, other: Metric) -> Metric:
    """The metric over both sets of batches (elementwise add; works inside jit)."""
    if type(other) is not type(self):
      raise TypeError(f"cannot merge {type(self).__name__} with {type(other).__name__}")
    for a, b in zip(jax.tree.leaves(self), jax.tree.leaves(other)):
      if np.shape(a) != np.shape(b):
        raise ValueError(f"cannot merge {type(self).__name__}s of shapes "
                         f"{np.shape(a)} and {np.shape(b)}")
    # `+`, not jnp.add, so host (float64 numpy) metrics stay float64.
    return jax.tree.map(lambda a, b: a + b, self, other)

  @abc.abstractmethod
  def compute(self) -> dict[str, Any]:
    """The metric's values on the host, from its sums."""


@flax.struct.dataclass
class Count(Metric):
  """The (weighted) number of examples."""
  count: jax.Array

  @classmethod
  def empty(cls) -> Count:
    return cls(jnp.zeros((), jnp.float32))

  @classmethod
  def from_batch(cls, weights_B) -> Count:
    return cls(jnp.asarray(weights_B, jnp.float32).sum())

  def compute(self) -> dict[str, float]:
    return {"num_examples": float(_host(self.count))}


@flax.struct.dataclass
class MeanLoss(Metric):
  """Mean loss per token (or example) and its perplexity exp(mean loss)."""
  loss_sum: jax.Array
  count: jax.Array

  @classmethod
  def empty(cls) -> MeanLoss:
    return cls(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))

  @classmethod
  def from_batch(cls, losses, weights=None) -> MeanLoss:
    """From per-token (or per-example) losses of any shape."""
    w = _weights(weights, losses)
    return cls((jnp.asarray(losses, jnp.float32) * w).sum(), w.sum())

  @classmethod
  def from_sums(cls, loss_sum, count) -> MeanLoss:
    """From sums a task already has (e.g. layers.vocab_loss.cross_entropy_sums)."""
    return cls(jnp.asarray(loss_sum, jnp.float32), jnp.asarray(count, jnp.float32))

  def compute(self) -> dict[str, float]:
    loss = _div(_host(self.loss_sum), _host(self.count))
    return {"loss": loss, "perplexity": math.exp(min(loss, MAX_LOG_PERPLEXITY))}


@flax.struct.dataclass
class Accuracy(Metric):
  """The weighted fraction of predictions equal to the labels (every label counts: give an
  ignore index weight 0)."""
  correct: jax.Array
  count: jax.Array

  @classmethod
  def empty(cls) -> Accuracy:
    return cls(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))

  @classmethod
  def from_batch(cls, pred, labels, weights=None) -> Accuracy:
    """From predicted and true class ids of the same shape (argmax the logits first)."""
    w = _weights(weights, labels)
    return cls(((jnp.asarray(pred) == jnp.asarray(labels)) * w).sum(), w.sum())

  def compute(self) -> dict[str, float]:
    return {"accuracy": _div(_host(self.correct), _host(self.count))}


@flax.struct.dataclass
class ConfusionMatrix(Metric):
  """Weighted counts [C, C], rows the true class and columns the predicted one; gives
  accuracy and precision, recall and F1 per class and macro-averaged.

  Per class, a zero denominator gives 0 (sklearn's zero_division=0). Macro averages are
  over the classes that occur among the labels or the predictions, as sklearn's
  `f1_score(y_true, y_pred, average="macro", zero_division=0)` does with its default
  `labels`: a class never seen and never predicted neither helps nor hurts (it is listed in
  `per_class` with zeros and support 0). Rows whose label or prediction lies outside
  [0, C) count 0, so an ignore index such as -100 needs no weight of its own.
  """
  matrix: jax.Array

  @property
  def num_classes(self) -> int:
    return self.matrix.shape[0]

  @classmethod
  def empty(cls, num_classes: int) -> ConfusionMatrix:
    return cls(jnp.zeros((num_classes, num_classes), jnp.float32))

  @classmethod
  def from_batch(cls, pred, labels, weights=None, *, num_classes: int) -> ConfusionMatrix:
    """From predicted and true class ids of the same shape; `num_classes` is static."""
    C = num_classes
    w = _weights(weights, labels).ravel()
    pred, labels = jnp.asarray(pred).ravel(), jnp.asarray(labels).ravel()
    valid = (labels >= 0) & (labels < C) & (pred >= 0) & (pred < C)
    flat = jnp.where(valid, labels * C + pred, 0)
    counts = jnp.zeros(C * C, jnp.float32).at[flat].add(jnp.where(valid, w, 0.0))
    return cls(counts.reshape(C, C))

  def compute(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """accuracy, macro_precision, macro_recall, macro_f1 (floats), per_class
    ({name: {precision, recall, f1, support}}, names default to "0", "1", ...) and
    confusion_matrix (nested lists of floats)."""
    m = _host(self.matrix)
    C = m.shape[0]
    names = [str(i) for i in range(C)] if class_names is None else [str(n) for n in class_names]
    if len(names) != C:
      raise ValueError(f"class_names has {len(names)} names for {C} classes")
    tp, support, predicted = np.diag(m), m.sum(1), m.sum(0)
    per_class, present = {}, []
    for c, name in enumerate(names):
      p, r = _div(tp[c], predicted[c]), _div(tp[c], support[c])
      f1 = _div(2 * p * r, p + r)
      per_class[name] = {"precision": p, "recall": r, "f1": f1, "support": float(support[c])}
      if support[c] > 0 or predicted[c] > 0:
        present.append(per_class[name])

    def macro(key: str) -> float:
      return float(np.mean([s[key] for s in present])) if present else 0.0

    return {"accuracy": _div(tp.sum(), m.sum()), "macro_precision": macro("precision"),
            "macro_recall": macro("recall"), "macro_f1": macro("f1"), "per_class": per_class,
            "confusion_matrix": m.tolist()}


@flax.struct.dataclass
class SpanMatch(Metric):
  """Extractive QA on token positions: exact start-and-end matches and the token-overlap F1
  of the predicted span with the gold span (inclusive ends, as BERT's QA head predicts).

  It is the SQuAD F1 over positions, not over normalized words: a repeated word or a
  punctuation token makes it differ from the official numbers, which jaxlm.evals.text
  computes from the decoded strings.
  """
  exact_sum: jax.Array
  f1_sum: jax.Array
  count: jax.Array

  @classmethod
  def empty(cls) -> SpanMatch:
    z = jnp.zeros((), jnp.float32)
    return cls(z, z, z)

  @classmethod
  def from_batch(cls, pred_start_B, pred_end_B, gold_start, gold_end,
                 weights_B=None) -> SpanMatch:
    """`gold_start`/`gold_end` are [B] or [B, K] (K acceptable answers, each row scored
    against its best one; pad with -1). Rows with no valid gold span count 0."""
    ps, pe = jnp.asarray(pred_start_B)[:, None], jnp.asarray(pred_end_B)[:, None]
    gs, ge = jnp.asarray(gold_start), jnp.asarray(gold_end)
    gs, ge = (gs[:, None], ge[:, None]) if gs.ndim == 1 else (gs, ge)
    ok = (gs >= 0) & (ge >= gs)  # [B, K]
    exact = (ps == gs) & (pe == ge) & ok
    overlap = jnp.maximum(jnp.minimum(pe, ge) - jnp.maximum(ps, gs) + 1, 0)
    lengths = jnp.maximum(pe - ps + 1, 0) + (ge - gs + 1)  # > 0 wherever ok
    f1 = jnp.where(ok, 2.0 * overlap / jnp.maximum(lengths, 1), 0.0)
    w = _weights(weights_B, ps[:, 0]) * ok.any(-1)
    return cls((exact.any(-1) * w).sum(), (f1.max(-1) * w).sum(), w.sum())

  def compute(self) -> dict[str, float]:
    n = _host(self.count)
    return {"exact_match": _div(_host(self.exact_sum), n), "f1": _div(_host(self.f1_sum), n)}


def to_host(metric):
  """A metric (or a pytree of them) as float64 numpy sums, for exact merging on the host."""
  return jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(metric))


def accumulate(total, new):
  """`total` merged with `new` (any pytree of metrics); `new` when `total` is None, so a
  loop can start from nothing: `acc = accumulate(acc, eval_step(params, batch))`."""
  return new if total is None else jax.tree.map(lambda a, b: a + b, total, new)


def compute_all(metrics: Mapping[str, Metric]) -> dict[str, Any]:
  """One flat dict from named metrics: key `name_key`, or just `key` for the name ""."""
  out: dict[str, Any] = {}
  for name, metric in metrics.items():
    for key, value in metric.compute().items():
      full = f"{name}_{key}" if name else key
      if full in out:
        raise ValueError(f"two metrics report {full!r}")
      out[full] = value
  return out
