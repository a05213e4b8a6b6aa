"""`mlm`: BERT's masked language model. About 15% of tokens are picked (80% [MASK],
10% random, 10% kept) and predicted; the vocabulary projection runs at the picked
positions only. Its report fills in a masked word of a few test lines."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data import pipeline
from jaxlm.data.objectives import max_predictions
from jaxlm.tasks.base import (Task, accuracy, example_weights, fmt, mean_loss, register,
                              router_stats, token_stats)


class MaskedLM(Task):
  """What every BERT pretraining objective shares: the BertForPreTraining forward pass,
  MLM statistics and the fill-mask report. Subclasses choose the pair objective."""

  architectures = ("BertForPreTraining",)
  model_kind = "BERT with its pretraining heads"
  mlm, pairs = True, False  # which parts of a BERT example are live (pipeline.BertPairs)
  builder = pipeline.BertPairs

  def examples(self, corpus, split, data_cfg, seed):
    return pipeline.bert_examples(corpus, split, data_cfg, mlm=self.mlm, pairs=self.pairs,
                                  builder=self.builder)

  def vocab_positions_fraction(self, data_cfg) -> float:
    if not self.mlm:
      return 0.0
    return max_predictions(data_cfg.max_seq_len, data_cfg.mask_prob) / data_cfg.max_seq_len

  def forward(self, model, batch, rngs=None):
    return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                 masked_positions=batch["masked_positions"], project_logits=False, rngs=rngs)

  def mlm_stats(self, out, batch):
    w_BP = batch["masked_weights"] * example_weights(batch)[:, None]
    return token_stats(out.projection, batch["masked_ids"], w_BP, "mlm")

  def stats(self, model, batch, rngs=None):
    out = self.forward(model, batch, rngs)
    return {**router_stats(model, out), **self.mlm_stats(out, batch)}

  def counts(self, batch):
    return {"mlm_count": (batch["masked_weights"] * example_weights(batch)[:, None]).sum()}

  def loss(self, stats):
    return mean_loss(stats, "mlm")

  def train_metrics(self, m):
    return {"mlm_accuracy": accuracy(m, "mlm")}

  def eval_metrics(self, sums, unigram_nll):
    return mlm_metrics(sums, unigram_nll)

  def samples(self, model, corpus, evaluator, cfg):
    return {"fill_mask": fill_mask_examples(model, corpus, cfg.eval.fill_mask_examples,
                                            max_seq_len=cfg.data.max_seq_len)}

  def report_lines(self, rep):
    lines = [f"val:  MLM perplexity {fmt(rep, 'val_mlm_perplexity')} (unigram baseline "
             f"{fmt(rep, 'unigram_perplexity')}), MLM accuracy {fmt(rep, 'val_mlm_accuracy')}",
             f"test: MLM perplexity {fmt(rep, 'test_mlm_perplexity')}, MLM accuracy "
             f"{fmt(rep, 'test_mlm_accuracy')}"]
    for ex in rep.get("fill_mask", []):
      guesses = ", ".join(f"{t} {p:.2f}" for t, p in ex["top5"])
      lines.append(f"  {ex['text']}\n    answer {ex['answer']!r}; top-5: {guesses}")
    return lines


def mlm_metrics(sums, unigram_nll) -> dict[str, float]:
  """MLM loss, perplexity, accuracy and the unigram baseline ({} without masked tokens)."""
  if not sums["mlm_count"]:
    return {}
  n = max(sums["mlm_count"], 1.0)
  loss = sums["mlm_loss_sum"] / n
  return {"mlm_loss": loss, "mlm_perplexity": math.exp(min(loss, 50.0)),
          "mlm_accuracy": sums["mlm_correct"] / n,
          "unigram_perplexity": math.exp(unigram_nll / n)}


@register
class MLM(MaskedLM):
  name = "mlm"

  def eval_metrics(self, sums, unigram_nll):
    out = mlm_metrics(sums, unigram_nll)
    return {"loss": out.get("mlm_loss", 0.0), **out}


# ---- the fill-mask report ---------------------------------------------------------------
def _pick_mask_position(ids: np.ndarray, tok) -> int | None:
  """A whole single-token word away from the edges: a readable blank to fill."""
  n = len(ids)
  for i in [n // 2 + d for d in range(0, n // 2 - 1) for d in (d, -d)]:
    nxt = int(ids[i + 1]) if i + 1 < n else None
    if (1 <= i < n - 1 and tok.is_word_start(int(ids[i])) and nxt is not None
        and tok.is_word_start(nxt) and tok.id_to_token(int(ids[i])).strip("▁").isalpha()):
      return i
  return None


def fill_mask_examples(model, corpus, n: int, *, max_seq_len: int,
                       min_tokens: int = 8) -> list[dict[str, Any]]:
  """Masks one word in each of the first `n` test lines long enough, and lists the
  model's top-5 guesses with their probabilities."""
  tok, split = corpus.tokenizer, corpus.splits["test"]
  out = []
  for i in range(len(split.line_offsets) - 1):
    if len(out) >= n:
      break
    ids = np.asarray(split.line(i), np.int64)[:max_seq_len - 2]
    if len(ids) < min_tokens:
      continue
    pos = _pick_mask_position(ids, tok)
    if pos is None:
      continue
    masked = ids.copy()
    masked[pos] = tok.mask_id
    input_ids = jnp.asarray([[tok.cls_id, *masked.tolist(), tok.sep_id]], jnp.int32)
    logits = model(input_ids, masked_positions=jnp.asarray([[pos + 1]], jnp.int32)).logits
    probs = jax.nn.softmax(logits[0, 0].astype(jnp.float32))
    top = np.argsort(-np.asarray(probs))[:5]
    out.append({
        "text": tok.decode(masked.tolist(), skip_special=False),
        "answer": tok.id_to_token(int(ids[pos])),
        "top5": [[tok.id_to_token(int(j)), round(float(probs[j]), 4)] for j in top],
    })
  return out
