"""`classify`: sequence classification of a passage (BERT-like encoders pool [CLS];
decoders pool each row's last real token, as transformers does). The embedded default
is the genre of a window of a scene (`finetune.dataset="genre"`); a JSONL file of
{"text", "label"} records works too. Reports accuracy, macro and per-class F1, the
confusion matrix, and the majority-class baseline (the train split's commonest label)."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.data import labeled
from jaxlm.errors import DataError
from jaxlm.evals.metrics import ConfusionMatrix
from jaxlm.tasks.base import classifier_stats, example_weights, fmt, mean_loss, register
from jaxlm.tasks.finetune_base import FineTuneTask, decoder_row, encoder_row


def model_inputs(model, batch) -> dict:
  """The batch arrays the model takes (decoders have no token types)."""
  kw = {"attention_mask": batch["attention_mask"]}
  if not model.config.causal and "token_type_ids" in batch:
    kw["token_type_ids"] = batch["token_type_ids"]
  return kw


def with_labels(cfg: ModelConfig, names) -> ModelConfig:
  names = [str(n) for n in names]
  return cfg.replace(num_labels=len(names), id2label={str(i): n for i, n in enumerate(names)},
                     label2id={n: i for i, n in enumerate(names)})


@register
class Classify(FineTuneTask):
  name = "classify"
  heads: ClassVar[dict[str, str]] = {"bert": "BertForSequenceClassification",
           "roberta": "RobertaForSequenceClassification",
           "distilbert": "DistilBertForSequenceClassification",
           "llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
           "gpt2": "GPT2ForSequenceClassification"}

  def head_config(self, pretrained, data):
    return with_labels(super().head_config(pretrained, data), data.labels)

  def from_jsonl(self, cfg, tok):
    recs = labeled.jsonl_records(cfg.data.source, ("text", "label"), cfg.data.split, cfg.seed)
    names = list(cfg.finetune.labels) or sorted({str(r["label"]) for s in recs.values()
                                                 for r in s})
    out = {}
    for split, rows in recs.items():
      for r in rows:
        if str(r["label"]) not in names:
          raise DataError(f"{cfg.data.source}: label {r['label']!r} is not one of "
                          f"finetune.labels {names}")
      ids = tok.encode_batch([r["text"] for r in rows])
      out[split] = [{"ids": i, "label": names.index(str(r["label"]))} for i, r in zip(ids, rows)]
    return labeled.LabeledData(tok, out, tuple(names), {"dataset": cfg.data.source})

  def prepare_data(self, cfg, tok_cfg, directory, log):
    data = super().prepare_data(cfg, tok_cfg, directory, log)
    counts = {s: data.label_counts(s).tolist() for s in data.records}
    data.manifest["class_balance"] = {name: [counts[s][i] for s in counts]
                                      for i, name in enumerate(data.labels)}
    maj = data.majority_label()
    log("class balance (train/validation/test): " + ", ".join(
        f"{n} {'/'.join(map(str, c))}" for n, c in data.manifest["class_balance"].items()))
    log(f"majority class (train): {data.labels[maj]}; its share of validation "
        f"{counts['validation'][maj] / max(sum(counts['validation']), 1):.3f}, of test "
        f"{counts['test'][maj] / max(sum(counts['test']), 1):.3f}")
    return data

  def examples(self, data, split, data_cfg, seed):
    tok, L = data.tokenizer, data_cfg.max_seq_len
    encoder = tok.cls_id is not None and tok.sep_id is not None

    def row(r):
      out = (encoder_row(r["ids"], None, tok, L, tok.pad_id) if encoder
             else decoder_row(r["ids"], L, tok.pad_id if tok.pad_id is not None else 0))
      return {**out, "label": np.int32(r["label"])}

    return self.rows(data, split, row)

  def stats(self, model, batch, rngs=None):
    out = model(batch["input_ids"], **model_inputs(model, batch), rngs=rngs)
    w_B = example_weights(batch)
    cm = ConfusionMatrix.from_batch(out.logits.argmax(-1), batch["label"], w_B,
                                    num_classes=out.logits.shape[-1])
    return {**classifier_stats(out.logits, batch["label"], w_B, "cls"), "confusion": cm.matrix}

  def counts(self, batch):
    return {"cls_count": example_weights(batch).sum()}

  def loss(self, stats):
    return mean_loss(stats, "cls")

  def train_metrics(self, m):
    return {"accuracy": float(m["cls_correct"] / max(m["cls_count"], 1))}

  def baseline_sums(self, data, batch):
    w = batch["example_weight"]
    return {"majority_correct": float(((batch["label"] == data.majority_label()) * w).sum())}

  def eval_metrics(self, sums, unigram_nll, data=None):
    n = max(sums["cls_count"], 1.0)
    cm = ConfusionMatrix(np.asarray(sums["confusion"])).compute(data.labels if data else None)
    return {"loss": sums["cls_loss_sum"] / n, "accuracy": cm["accuracy"],
            "macro_precision": cm["macro_precision"], "macro_recall": cm["macro_recall"],
            "macro_f1": cm["macro_f1"], "per_class": cm["per_class"],
            "confusion_matrix": cm["confusion_matrix"],
            "majority_baseline_accuracy": sums.get("majority_correct", 0.0) / n,
            "num_examples": sums["cls_count"]}

  def samples(self, model, data, evaluator, cfg):
    out = {"class_balance": data.manifest.get("class_balance"),
           "labels": list(data.labels), "majority_label": data.labels[data.majority_label()]}
    if data.records["test"] and "scene" in data.records["test"][0]:
      for split, name in (("validation", "val"), ("test", "test")):
        out.update({f"{name}_{k}": v for k, v in scene_scores(model, data, evaluator,
                                                              split).items()})
    return out

  def report_lines(self, rep):
    lines = []
    for split in ("val", "test"):
      if f"{split}_scene_accuracy" in rep:
        lines.append(f"{split}, whole scenes ({fmt(rep, f'{split}_scenes')}; mean window "
                     f"log-probabilities): accuracy {fmt(rep, f'{split}_scene_accuracy')}, "
                     f"macro-F1 {fmt(rep, f'{split}_scene_macro_f1')} (majority-class "
                     f"baseline {fmt(rep, f'{split}_scene_majority_baseline_accuracy')})")
    for split in ("val", "test"):
      lines.append(f"{split}: accuracy {fmt(rep, f'{split}_accuracy')}, macro-F1 "
                   f"{fmt(rep, f'{split}_macro_f1')} (majority-class baseline "
                   f"{fmt(rep, f'{split}_majority_baseline_accuracy')})")
    balance = rep.get("class_balance")
    if balance:
      lines.append("class balance (train/val/test): " + ", ".join(
          f"{name} {'/'.join(str(c) for c in counts)}" for name, counts in balance.items()))
    return lines


def scene_scores(model, data, evaluator, split: str) -> dict:
  """Whole-scene classification from the windows of each scene: the mean of their
  log-probabilities (the windows the evaluator holds, in record order)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def logp(state, batch):
    out = nnx.merge(graphdef, state)(batch["input_ids"], **model_inputs(model, batch))
    return jax.nn.log_softmax(out.logits.astype(jnp.float32))

  rows = [np.asarray(logp(state, b))[b["example_weight"] > 0]
          for b in evaluator.batches(split)]
  lp = np.concatenate(rows) if rows else np.zeros((0, len(data.labels)))
  by_scene: dict[str, list] = {}
  for rec, row in zip(data.records[split], lp):
    by_scene.setdefault(rec["scene"], [rec["label"], []])[1].append(row)
  labels = np.array([v[0] for v in by_scene.values()], np.int32)
  pred = np.array([np.mean(v[1], axis=0).argmax() for v in by_scene.values()], np.int32)
  cm = ConfusionMatrix.from_batch(pred, labels, num_classes=len(data.labels)).compute()
  return {"scenes": len(labels), "scene_accuracy": cm["accuracy"],
          "scene_macro_f1": cm["macro_f1"],
          "scene_majority_baseline_accuracy": float(np.mean(labels == data.majority_label()))}
