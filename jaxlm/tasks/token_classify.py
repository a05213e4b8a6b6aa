"""`token_classify`: one label per word (NER-style tagging; BertForTokenClassification).
Data: a JSONL file of {"tokens": [words], "labels": [tags]} records; each word's first
subword carries its tag (the rest, and the special tokens, are not scored), as in the
Hugging Face token-classification recipe. Metrics: accuracy, macro and per-tag precision,
recall and F1 over words, and the majority-tag baseline."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data import labeled
from jaxlm.errors import ConfigError, DataError
from jaxlm.evals.metrics import ConfusionMatrix
from jaxlm.tasks.base import example_weights, fmt, register
from jaxlm.tasks.classify import with_labels
from jaxlm.tasks.finetune_base import FineTuneTask, encoder_row


def word_rows(words: list[str], tags: list[int], tok, max_len: int):
  """Subword ids and per-subword tags (-1 except on each word's first subword)."""
  ids, labels = [], []
  for word, tag in zip(words, tags):
    pieces = tok.encode(word) or ([tok.unk_id] if tok.unk_id is not None else [])
    ids += pieces
    labels += [tag] + [-1] * (len(pieces) - 1)
  return ids[:max_len - 2], labels[:max_len - 2]


@register
class TokenClassify(FineTuneTask):
  name = "token_classify"
  heads: ClassVar[dict[str, str]] = {"bert": "BertForTokenClassification"}

  def head_config(self, pretrained, data):
    return with_labels(super().head_config(pretrained, data), data.labels)

  def validate(self, cfg):
    super().validate(cfg)
    if cfg.finetune.dataset:
      raise ConfigError("train.objective='token_classify' has no embedded dataset; set "
                      "finetune.dataset='' and data.source to a JSONL file of "
                      "{'tokens', 'labels'} records")

  def from_jsonl(self, cfg, tok):
    src = cfg.data.source
    recs = labeled.jsonl_records(src, ("tokens", "labels"), cfg.data.split, cfg.seed)
    names = list(cfg.finetune.labels) or sorted({str(t) for s in recs.values() for r in s
                                                 for t in r["labels"]})
    out = {}
    for split, rows in recs.items():
      out[split] = []
      for i, r in enumerate(rows):
        if len(r["tokens"]) != len(r["labels"]):
          raise DataError(f"{src}: {split} record {i} has {len(r['tokens'])} tokens but "
                          f"{len(r['labels'])} labels")
        bad = [t for t in r["labels"] if str(t) not in names]
        if bad:
          raise DataError(f"{src}: label {bad[0]!r} is not one of finetune.labels {names}")
        ids, tags = word_rows([str(w) for w in r["tokens"]],
                              [names.index(str(t)) for t in r["labels"]], tok,
                              cfg.data.max_seq_len)
        out[split].append({"ids": ids, "tags": tags})
    return labeled.LabeledData(tok, out, tuple(names), {"dataset": src})

  def examples(self, data, split, data_cfg, seed):
    tok, L = data.tokenizer, data_cfg.max_seq_len

    def row(r):
      out = encoder_row(r["ids"], None, tok, L, tok.pad_id)
      tags = np.full(L, -1, np.int32)
      tags[1:1 + len(r["tags"])] = r["tags"]  # after [CLS]
      return {**out, "tags": tags}

    return self.rows(data, split, row)

  def stats(self, model, batch, rngs=None):
    out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                rngs=rngs)
    tags = batch["tags"]
    w_BT = (tags >= 0) * example_weights(batch)[:, None]
    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, jnp.maximum(tags, 0)[..., None], axis=-1)[..., 0]
    cm = ConfusionMatrix.from_batch(logp.argmax(-1), tags, w_BT,
                                    num_classes=out.logits.shape[-1])
    return {"tok_loss_sum": (nll * w_BT).sum(), "tok_count": w_BT.sum(), "confusion": cm.matrix}

  def counts(self, batch):
    return {"tok_count": ((batch["tags"] >= 0) * example_weights(batch)[:, None]).sum()}

  def loss(self, stats):
    return stats["tok_loss_sum"] / jnp.maximum(stats["tok_count"], 1.0)

  def baseline_sums(self, data, batch):
    counts = np.bincount([t for r in data.records["train"] for t in r["tags"] if t >= 0],
                         minlength=len(data.labels))
    w = (batch["tags"] >= 0) * batch["example_weight"][:, None]
    return {"majority_correct": float(((batch["tags"] == counts.argmax()) * w).sum())}

  def eval_metrics(self, sums, unigram_nll, data=None):
    n = max(sums["tok_count"], 1.0)
    cm = ConfusionMatrix(np.asarray(sums["confusion"])).compute(data.labels if data else None)
    return {"loss": sums["tok_loss_sum"] / n, **{k: cm[k] for k in (
        "accuracy", "macro_precision", "macro_recall", "macro_f1", "per_class",
        "confusion_matrix")}, "majority_baseline_accuracy": sums.get("majority_correct", 0.0) / n,
            "num_words": sums["tok_count"]}

  def report_lines(self, rep):
    return [f"{s}: word accuracy {fmt(rep, f'{s}_accuracy')}, macro-F1 "
            f"{fmt(rep, f'{s}_macro_f1')} (majority-tag baseline "
            f"{fmt(rep, f'{s}_majority_baseline_accuracy')})" for s in ("val", "test")]
