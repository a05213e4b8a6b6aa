"""Evaluation metrics: on-device accumulating sums (metrics) and host text metrics (text)."""

from jaxlm.evals.metrics import (
  MAX_LOG_PERPLEXITY,
  Accuracy,
  ConfusionMatrix,
  Count,
  MeanLoss,
  Metric,
  SpanMatch,
  accumulate,
  compute_all,
  to_host,
)
from jaxlm.evals.text import (
  RougeAccumulator,
  exact_match,
  normalize_answer,
  rouge,
  squad_scores,
  token_f1,
)

__all__ = [
  "MAX_LOG_PERPLEXITY", "Accuracy", "ConfusionMatrix", "Count", "MeanLoss", "Metric",
  "RougeAccumulator", "SpanMatch", "accumulate", "compute_all", "exact_match",
  "normalize_answer", "rouge", "squad_scores", "to_host", "token_f1",
]
