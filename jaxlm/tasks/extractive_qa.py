"""`extractive_qa`: the answer is a span of the context ([CLS] question [SEP] context
[SEP]); the model gives start and end logits per token (BertForQuestionAnswering). The
embedded default is "who speaks" (`finetune.dataset="who_speaks"`): a stretch of dialogue
and one quoted line; the answer names its speaker. A JSONL file of {"question",
"context", "answer"} records works too (the answer's first occurrence in the context).

Metrics: span exact match and F1 on token positions (on device), and SQuAD exact match and
token F1 of the decoded answers (report and eval.json), next to the "most frequent
speaker in the context" baseline of the embedded task."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.data import labeled
from jaxlm.errors import DataError
from jaxlm.evals import text
from jaxlm.evals.metrics import SpanMatch
from jaxlm.tasks.base import example_weights, fmt, register
from jaxlm.tasks.finetune_base import FineTuneTask, encoder_row

MAX_ANSWER_TOKENS = 16


def best_spans(start_BT, end_BT, context_BT, max_len: int = MAX_ANSWER_TOKENS):
  """(start, end) [B] maximizing start + end logits over spans of the context with
  start <= end < start + max_len."""
  T = start_BT.shape[1]
  i, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
  ok_TT = (j >= i) & (j < i + max_len)
  ok_BTT = ok_TT[None] & context_BT[:, :, None] & context_BT[:, None, :]
  score = jnp.where(ok_BTT, start_BT[:, :, None] + end_BT[:, None, :], -jnp.inf)
  flat = score.reshape(score.shape[0], -1).argmax(-1)
  return flat // T, flat % T


@register
class ExtractiveQA(FineTuneTask):
  name = "extractive_qa"
  heads: ClassVar[dict[str, str]] = {"bert": "BertForQuestionAnswering"}

  def from_jsonl(self, cfg, tok):
    recs = labeled.jsonl_records(cfg.data.source, ("question", "context", "answer"),
                                 cfg.data.split, cfg.seed)
    out = {}
    for split, rows in recs.items():
      out[split] = []
      for r in rows:
        at = r["context"].find(r["answer"])
        if not r["answer"] or at < 0:
          raise DataError(f"{cfg.data.source}: answer {r['answer']!r} is not in its context")
        before = tok.encode(r["context"][:at])
        ans = tok.encode(r["answer"])
        ctx = before + ans + tok.encode(r["context"][at + len(r["answer"]):])
        out[split].append({"question": tok.encode(r["question"]), "context": ctx,
                           "answer": r["answer"], "answer_span": (len(before),
                                                                   len(before) + len(ans) - 1),
                           "baseline": None})
    return labeled.LabeledData(tok, out, (), {"dataset": cfg.data.source})

  def examples(self, data, split, data_cfg, seed):
    tok, L = data.tokenizer, data_cfg.max_seq_len

    def row(r):
      out = encoder_row(r["question"], r["context"], tok, L, tok.pad_id)
      shift = len(r["question"]) + 2  # [CLS] question [SEP]
      s, e = r["answer_span"][0] + shift, r["answer_span"][1] + shift
      if e >= L - 1:  # the answer was cut off: no span to learn (weight 0)
        s = e = 0
      ctx = (out["token_type_ids"] == 1) & (out["attention_mask"] == 1)
      ctx[min(shift + len(r["context"]), L - 1)] = False  # the final [SEP]
      return {**out, "start_positions": np.int32(s), "end_positions": np.int32(e),
              "context_mask": ctx, "has_answer": np.float32(e > 0),
              "baseline_correct": np.float32(r["baseline"] == r["answer"])}

    return self.rows(data, split, row)

  def stats(self, model, batch, rngs=None):
    out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                rngs=rngs)
    w_B = example_weights(batch) * batch["has_answer"]
    nll = 0.0
    for logits, gold in ((out.start_logits, batch["start_positions"]),
                         (out.end_logits, batch["end_positions"])):
      logp = jax.nn.log_softmax(logits.astype(jnp.float32))
      nll = nll - jnp.take_along_axis(logp, gold[:, None], axis=-1)[:, 0] / 2
    ps, pe = best_spans(out.start_logits.astype(jnp.float32),
                        out.end_logits.astype(jnp.float32), batch["context_mask"])
    span = SpanMatch.from_batch(ps, pe, batch["start_positions"], batch["end_positions"], w_B)
    return {"qa_loss_sum": (nll * w_B).sum(), "qa_count": w_B.sum(),
            "span_exact_sum": span.exact_sum, "span_f1_sum": span.f1_sum}

  def counts(self, batch):
    return {"qa_count": (example_weights(batch) * batch["has_answer"]).sum()}

  def loss(self, stats):
    return stats["qa_loss_sum"] / jnp.maximum(stats["qa_count"], 1.0)

  def train_metrics(self, m):
    return {"exact_match": float(m["span_exact_sum"] / max(m["qa_count"], 1))}

  def baseline_sums(self, data, batch):
    w = batch["example_weight"]
    return {"baseline_correct": float((batch["baseline_correct"] * w).sum()),
            "examples": float(w.sum())}

  def eval_metrics(self, sums, unigram_nll, data=None):
    n = max(sums["qa_count"], 1.0)
    out = {"loss": sums["qa_loss_sum"] / n, "exact_match": sums["span_exact_sum"] / n,
           "f1": sums["span_f1_sum"] / n, "num_examples": sums["qa_count"]}
    if data is not None and data.manifest.get("dataset") == "who_speaks":
      out["baseline_exact_match"] = sums["baseline_correct"] / max(sums["examples"], 1.0)
    return out

  def samples(self, model, data, evaluator, cfg):
    """SQuAD exact match and F1 of the decoded answers of the test split, and examples."""
    tok = data.tokenizer
    preds, golds, shown = [], [], []
    step = _predict(model)
    for batch in evaluator.batches("test"):
      ps, pe = jax.device_get(step(batch))
      for b in range(len(ps)):
        if batch["example_weight"][b] == 0:
          continue
        ids = batch["input_ids"][b]
        gs, ge = batch["start_positions"][b], batch["end_positions"][b]
        preds.append(tok.decode(ids[ps[b]:pe[b] + 1].tolist()))
        golds.append(tok.decode(ids[gs:ge + 1].tolist()))
        if len(shown) < cfg.eval.samples:
          shown.append({"input": tok.decode(ids.tolist())[:300], "answer": golds[-1],
                        "prediction": preds[-1]})
    scores = text.squad_scores(preds, golds) if preds else {}
    return {"samples": shown, **{f"test_text_{k}": v for k, v in scores.items()}}

  def report_lines(self, rep):
    lines = [f"{s}: exact match {fmt(rep, f'{s}_exact_match')}, F1 {fmt(rep, f'{s}_f1')}"
             + (f" (most-frequent-speaker baseline {fmt(rep, f'{s}_baseline_exact_match')})"
                if f"{s}_baseline_exact_match" in rep else "") for s in ("val", "test")]
    lines.append(f"test, decoded answers (SQuAD): exact match "
                 f"{fmt(rep, 'test_text_exact_match')}, F1 {fmt(rep, 'test_text_f1')}")
    for ex in rep.get("samples", []):
      lines.append(f"  {ex['input'][:120]}...\n    answer: {ex['answer']}  model: "
                   f"{ex['prediction']}")
    return lines


def _predict(model):
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, batch):
    out = nnx.merge(graphdef, state)(batch["input_ids"], batch["attention_mask"],
                                     batch["token_type_ids"])
    return best_spans(out.start_logits.astype(jnp.float32), out.end_logits.astype(jnp.float32),
                      batch["context_mask"])
  return lambda batch: step(state, batch)
