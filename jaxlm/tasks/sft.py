"""`sft`: instruction tuning of a decoder-only LM on (prompt, response) pairs, with the
loss on the response tokens (and the end-of-sequence token that closes it) only. Pairs
are packed into rows with segment ids, so attention and positions restart at each pair.

Data: the embedded "next speaker" task (`finetune.dataset="next_speaker"`), or a JSONL
file of {"prompt", "response"} or chat-style {"messages": [{"role", "content"}, ...]}
records (the last assistant message is the response; the rest, as "role: content"
lines, the prompt). At the end the model answers test prompts greedily; the answers are
scored with exact match and ROUGE-L against the references, next to the majority
baseline (the train split's commonest response)."""

from __future__ import annotations

import collections

import numpy as np

from jaxlm.data import labeled, pipeline
from jaxlm.data.objectives import causal_example
from jaxlm.errors import ConfigError, DataError
from jaxlm.evals import text
from jaxlm.generate.text import complete
from jaxlm.models import decoder
from jaxlm.tasks.base import Task, fmt, register
from jaxlm.tasks.causal import TokenPrediction
from jaxlm.tasks.finetune_base import FineTuneTask, source


def chat_to_pair(messages, where: str) -> tuple[str, str]:
  if not isinstance(messages, list) or not messages or not all(
      isinstance(m, dict) and "content" in m for m in messages):
    raise DataError(f"{where}: messages must be a list of {{'role', 'content'}} objects")
  if messages[-1].get("role") != "assistant":
    raise DataError(f"{where}: the last message must be the assistant's (the response)")
  prompt = "\n".join(f"{m.get('role', 'user')}: {m['content']}" for m in messages[:-1])
  return prompt, messages[-1]["content"]


def pack(pairs: list[tuple[list[int], list[int]]], max_len: int, pad: int, seed: int):
  """Greedy packing of (prompt, response) token pairs, in a seeded order, into rows of
  `max_len`; the loss weights mark the positions that predict a response token."""
  order = np.random.default_rng(seed).permutation(len(pairs))
  rows, current, used = [], [], 0
  for i in order:
    p, r = pairs[i]
    n = len(p) + len(r)
    if used + n > max_len and current:
      rows.append(current)
      current, used = [], 0
    current.append((p, r))
    used += n
  if current:
    rows.append(current)
  return rows


def packed_row(row, max_len: int, pad: int) -> dict[str, np.ndarray]:
  out = causal_example([np.asarray(p + r, np.int32) for p, r in row], max_seq_len=max_len,
                       pad=pad)
  w = np.zeros(max_len, np.float32)
  t = 0
  for p, r in row:
    w[t + len(p) - 1:t + len(p) + len(r) - 1] = 1.0  # position t predicts token t + 1
    t += len(p) + len(r)
  out["loss_weights"] = w * out["loss_weights"]
  return out


@register
class SFT(TokenPrediction, FineTuneTask):
  name = "sft"
  finetune = True
  architectures = tuple(decoder.ARCHITECTURES)
  model_kind = "a decoder-only model"

  def check_model(self, model, source):
    Task.check_model(self, model, source)  # a decoder class (not FineTuneTask's head table)
    if not model.causal:
      raise ConfigError(f"train.objective='sft' needs a causal model, but {source} is not")

  def head_config(self, pretrained, data):
    return pretrained  # the LM head is the head

  def from_jsonl(self, cfg, tok):
    src = cfg.data.source
    recs = labeled.jsonl_records(src, (), cfg.data.split, cfg.seed)
    out = {}
    for split, rows in recs.items():
      out[split] = []
      for i, r in enumerate(rows):
        if "messages" in r:
          prompt, response = chat_to_pair(r["messages"], f"{src} ({split} record {i})")
        elif "prompt" in r and "response" in r:
          prompt, response = r["prompt"], r["response"]
        else:
          raise DataError(f"{src}: a record needs 'prompt' and 'response', or 'messages'")
        out[split].append({"prompt": str(prompt), "response": str(response)})
    return labeled.LabeledData(tok, out, (), {"dataset": src})

  def prepare_data(self, cfg, tok_cfg, directory, log):
    data = super().prepare_data(cfg, tok_cfg, directory, log)
    where = cfg.finetune.dataset or cfg.data.source
    for split, recs in data.records.items():
      for i, r in enumerate(recs):
        if not str(r["response"]).strip():
          raise DataError(f"{where}: {split} example {i} has an empty response "
                          f"(prompt {r['prompt'][:60]!r})")
    counts = collections.Counter(r["response"] for r in data.records["train"])
    data.manifest["majority_response"] = counts.most_common(1)[0][0]
    return data

  def _eos(self, data) -> int:
    return pipeline.end_of_document_id(data.tokenizer)

  def examples(self, data, split, data_cfg, seed):
    tok, L = data.tokenizer, data_cfg.max_seq_len
    eos = self._eos(data)
    if ("packed", split) not in data.cache:
      prompts = tok.encode_batch([r["prompt"] + "\n" for r in data.records[split]])
      responses = tok.encode_batch([r["response"] for r in data.records[split]])
      pairs = []
      for p, r in zip(prompts, responses):
        r = r + [eos]
        if len(r) >= L:
          raise ConfigError(f"data.max_seq_len ({L}) leaves no room for a prompt before a "
                            f"{len(r)}-token response")
        pairs.append((p[-(L - len(r)):], r))  # long prompts keep their end
      data.cache[("packed", split)] = pack(pairs, L, tok.pad_id or 0, seed)
    rows = data.cache[("packed", split)]
    pad = tok.pad_id if tok.pad_id is not None else 0
    return pipeline.Examples(source(rows), lambda row: packed_row(row, L, pad), False)

  def stats(self, model, batch, rngs=None):
    out = model(batch["input_ids"], batch["attention_mask"], segment_ids=batch["segment_ids"],
                position_ids=batch["position_ids"], project_logits=False, rngs=rngs)
    return self.lm_stats(model, out, batch)

  def vocab_positions_fraction(self, data_cfg):
    return 1.0

  def unigram_log_probs(self, corpus, vocab_size):
    return None

  def eval_metrics(self, sums, unigram_nll, data=None):
    n = max(sums["lm_count"], 1.0)
    loss = sums["lm_loss_sum"] / n
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))),
            "accuracy": sums["lm_correct"] / n, "response_tokens": sums["lm_count"]}

  def samples(self, model, data, evaluator, cfg):
    """Greedy answers to the first finetune.generate_examples test prompts: exact match
    and ROUGE-L against the references, and the majority baseline's."""
    f, tok = cfg.finetune, data.tokenizer
    recs = data.records["test"][:f.generate_examples]
    answers = complete(model, tok, [r["prompt"] for r in recs], eos=self._eos(data),
                     max_new_tokens=f.generate_max_new_tokens,
                     max_prompt=cfg.data.max_seq_len - f.generate_max_new_tokens)
    refs = [r["response"] for r in recs]
    maj = [data.manifest["majority_response"]] * len(refs)
    model_rouge = text.rouge(answers, refs, ("rougeL",))["rougeL"]
    base_rouge = text.rouge(maj, refs, ("rougeL",))["rougeL"]
    scores = {"test_generated_exact_match": text.squad_scores(answers, refs)["exact_match"],
              "test_generated_rougeL": model_rouge,
              "test_majority_exact_match": text.squad_scores(maj, refs)["exact_match"],
              "test_majority_rougeL": base_rouge, "test_generated_examples": len(refs),
              "majority_response": maj[0] if maj else None}
    shown = [{"prompt": r["prompt"][-200:], "reference": r["response"], "model": a}
             for r, a in zip(recs[:cfg.eval.samples], answers)]
    return {**scores, "samples": shown}

  def report_lines(self, rep):
    lines = [f"{s}: response-token loss {fmt(rep, f'{s}_loss')}, accuracy "
             f"{fmt(rep, f'{s}_accuracy')}" for s in ("val", "test")]
    lines.append(f"test answers ({fmt(rep, 'test_generated_examples')}): exact match "
                 f"{fmt(rep, 'test_generated_exact_match')}, ROUGE-L "
                 f"{fmt(rep, 'test_generated_rougeL')} (majority baseline "
                 f"{rep.get('majority_response')!r}: exact match "
                 f"{fmt(rep, 'test_majority_exact_match')}, ROUGE-L "
                 f"{fmt(rep, 'test_majority_rougeL')})")
    for ex in rep.get("samples", []):
      lines.append(f"  ...{ex['prompt'][-80:]!r}\n    reference: {ex['reference']}  model: "
                   f"{ex['model']}")
    return lines
