"""`causal`: next-token prediction over packed documents (decoder-only models). Rows pack
whole documents, each closed by an end-of-document token; attention and positions
restart at every document, and no loss crosses a document boundary or lands on padding.
Its report continues the openings of a few test documents greedily."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxlm.data import pipeline
from jaxlm.errors import ConfigError
from jaxlm.generate.decode import generate
from jaxlm.models import decoder
from jaxlm.tasks.base import (Task, accuracy, example_weights, fmt, mean_loss, register,
                              router_stats, token_metrics, token_stats)


class TokenPrediction(Task):
  """Teacher-forced prediction of `targets` where `loss_weights` is 1: what causal LM and
  span corruption share (statistics "lm_*", metrics, baseline and report lines)."""

  def lm_stats(self, model, out, batch):
    w_BT = batch["loss_weights"] * example_weights(batch)[:, None]
    return {**token_stats(out.projection, batch["targets"], w_BT, "lm"),
            **router_stats(model, out)}

  def counts(self, batch):
    return {"lm_count": (batch["loss_weights"] * example_weights(batch)[:, None]).sum()}

  def loss(self, stats):
    return mean_loss(stats, "lm")

  def train_metrics(self, m):
    return {"accuracy": accuracy(m, "lm")}

  def eval_metrics(self, sums, unigram_nll):
    return token_metrics(sums, unigram_nll, "lm")

  def unigram_log_probs(self, corpus, vocab_size):
    return pipeline.causal_unigram_log_probs(corpus, vocab_size)

  def unigram_targets(self, batch):
    return batch["targets"], batch["loss_weights"]

  def report_lines(self, rep):
    lines = [f"val:  perplexity {fmt(rep, 'val_perplexity')} (unigram baseline "
             f"{fmt(rep, 'unigram_perplexity')}), next-token accuracy {fmt(rep, 'val_accuracy')}",
             f"test: perplexity {fmt(rep, 'test_perplexity')}, next-token accuracy "
             f"{fmt(rep, 'test_accuracy')}"]
    for ex in rep.get("samples", []):
      if "prediction" in ex:
        lines.append(f"  {ex['input']}\n    target: {ex['target']}\n    model:  "
                     f"{ex['prediction']}")
      else:
        lines.append(f"  {ex['prompt']} >>> {ex['continuation']}")
    return lines


@register
class CausalLM(TokenPrediction):
  name = "causal"
  architectures = tuple(decoder.ARCHITECTURES)
  model_kind = "a decoder-only model"

  def check_model(self, model, source):
    super().check_model(model, source)
    if not model.causal:
      raise ConfigError("train.objective='causal' needs model.causal=True (otherwise every "
                        "token sees the one it must predict)")

  def validate(self, cfg):
    e = cfg.eval
    if e.samples and e.sample_prompt_tokens >= cfg.data.max_seq_len:
      raise ConfigError(f"eval.sample_prompt_tokens ({e.sample_prompt_tokens}) must be below "
                        f"data.max_seq_len ({cfg.data.max_seq_len})")

  def model_ids(self, tokenizer, data_cfg):
    eod = pipeline.end_of_document_id(tokenizer)
    return {"vocab_size": tokenizer.vocab_size, "eos_token_id": eod,
            "pad_token_id": eod if tokenizer.pad_id is None else tokenizer.pad_id}

  def examples(self, corpus, split, data_cfg, seed):
    return pipeline.causal_examples(corpus, split, data_cfg.max_seq_len, seed)

  def stats(self, model, batch, rngs=None):
    out = model(batch["input_ids"], batch["attention_mask"], segment_ids=batch["segment_ids"],
                position_ids=batch["position_ids"], project_logits=False, rngs=rngs)
    return self.lm_stats(model, out, batch)

  def samples(self, model, corpus, evaluator, cfg):
    e = cfg.eval
    return {"samples": continuation_samples(
        model, corpus, e.samples, eod=pipeline.end_of_document_id(corpus.tokenizer),
        prompt_tokens=e.sample_prompt_tokens,
        new_tokens=min(e.sample_new_tokens, cfg.data.max_seq_len - e.sample_prompt_tokens))}


# ---- greedy continuations for the report -----------------------------------------------
def continuation_samples(model, corpus, n: int, *, eod: int, prompt_tokens: int,
                         new_tokens: int) -> list[dict[str, Any]]:
  """Greedy continuations of the openings (`prompt_tokens` tokens) of the first `n`
  test documents long enough, cut at the end-of-document token."""
  tok, split = corpus.tokenizer, corpus.splits["test"]
  prompts = []
  for d in range(split.num_docs):
    if len(prompts) >= n:
      break
    start = split.line_offsets[split.doc_lines[d]]
    end = split.line_offsets[split.doc_lines[d + 1]]
    if end - start > prompt_tokens:
      prompts.append(np.asarray(split.tokens[start:start + prompt_tokens], np.int32))
  if not prompts or new_tokens < 1:
    return []
  out = []
  conts = generate(model, np.stack(prompts), max_new_tokens=new_tokens, eos_token_id=eod)
  for prompt, cont in zip(prompts, conts[:, prompt_tokens:]):
    cont = cont.tolist()
    cont = cont[:cont.index(eod)] if eod in cont else cont
    out.append({"prompt": tok.decode(prompt.tolist()), "continuation": tok.decode(cont)})
  return out
