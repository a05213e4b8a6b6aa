"""`nsp`: BERT's next-sentence prediction. Each example is a segment pair [CLS] A [SEP]
B [SEP]; half of the time B continues A in its document, otherwise it comes from another
document. A two-way classifier on the pooled [CLS] state says which. Its report lists a
few test pairs with the model's probability that B follows A."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxlm.tasks.base import (accuracy, classifier_stats, example_weights, fmt, mean_loss,
                              register, router_stats)
from jaxlm.tasks.mlm import MaskedLM, mlm_metrics


class PairClassification(MaskedLM):
  """A pair objective on BERT's pair head (`nsp_logits`), with or without MLM. `key`
  names its batch fields ({key}_label, {key}_weight), statistics and metrics."""

  key = "nsp"
  question = "B follows A"  # what label 1 means, for the report
  mlm, pairs = False, True

  def pair_stats(self, out, batch):
    w_B = batch[f"{self.key}_weight"] * example_weights(batch)
    return classifier_stats(out.nsp_logits, batch[f"{self.key}_label"], w_B, self.key)

  def stats(self, model, batch, rngs=None):
    out = self.forward(model, batch, rngs)
    mlm = self.mlm_stats(out, batch) if self.mlm else {}
    return {**router_stats(model, out), **mlm, **self.pair_stats(out, batch)}

  def counts(self, batch):
    pair = {f"{self.key}_count": (batch[f"{self.key}_weight"] * example_weights(batch)).sum()}
    return {**super().counts(batch), **pair} if self.mlm else pair

  def loss(self, stats):
    pair = mean_loss(stats, self.key)
    return mean_loss(stats, "mlm") + pair if self.mlm else pair

  def train_metrics(self, m):
    out = super().train_metrics(m) if self.mlm else {}
    return {**out, f"{self.key}_accuracy": accuracy(m, self.key)}

  def eval_metrics(self, sums, unigram_nll):
    n = max(sums[f"{self.key}_count"], 1.0)
    pair_loss = sums[f"{self.key}_loss_sum"] / n
    mlm = mlm_metrics(sums, unigram_nll) if self.mlm else {}
    out = {"loss": mlm.get("mlm_loss", 0.0) + pair_loss, **mlm}
    if sums[f"{self.key}_count"]:
      out.update({f"{self.key}_loss": pair_loss,
                  f"{self.key}_accuracy": sums[f"{self.key}_correct"] / n})
    return out

  def samples(self, model, corpus, evaluator, cfg):
    out = super().samples(model, corpus, evaluator, cfg) if self.mlm else {}
    pairs = pair_samples(model, corpus, evaluator.batches("test")[0], cfg.eval.samples,
                         self.key)
    return {**out, f"{self.key}_samples": pairs}

  def report_lines(self, rep):
    k = self.key.upper()
    lines = super().report_lines(rep) if self.mlm else []
    lines.append(f"{k} accuracy: val {fmt(rep, f'val_{self.key}_accuracy')}, "
                 f"test {fmt(rep, f'test_{self.key}_accuracy')}")
    for ex in rep.get(f"{self.key}_samples", []):
      lines.append(f"  A: {ex['a']}\n  B: {ex['b']}\n    label {ex['label']}, "
                   f"P({self.question}) {ex['p']:.2f}")
    return lines


@register
class NSP(PairClassification):
  name = "nsp"


def pair_samples(model, corpus, batch, n: int, key: str) -> list[dict[str, Any]]:
  """The first `n` pairs of an eval batch: segments A and B as text, the label and the
  model's probability of label 1."""
  if n < 1:
    return []
  batch = {k: v[:n] for k, v in batch.items()}
  out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  p1 = np.asarray(jax.nn.softmax(out.nsp_logits.astype("float32"))[:, 1])
  tok, special = corpus.tokenizer, set(corpus.tokenizer.special_ids)
  rows = []
  for i in range(len(p1)):
    ids, types = batch["input_ids"][i], batch["token_type_ids"][i]
    real = batch["attention_mask"][i] > 0
    seg = [[int(t) for t, y, r in zip(ids, types, real) if r and y == s and int(t) not in special]
           for s in (0, 1)]
    rows.append({"a": tok.decode(seg[0]), "b": tok.decode(seg[1]),
                 "label": int(batch[f"{key}_label"][i]), "p": round(float(p1[i]), 4)})
  return rows

