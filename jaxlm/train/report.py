"""The end-of-run report: headline numbers, and examples from the test split: fill-mask
guesses (BERT), greedy continuations of document openings (causal LM) or greedy span
reconstructions (T5 span corruption)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.data.corpus import Corpus


def _pick_mask_position(ids: np.ndarray, tok) -> int | None:
  """A whole single-token word away from the edges: a readable blank to fill."""
  n = len(ids)
  for i in [n // 2 + d for d in range(0, n // 2 - 1) for d in (d, -d)]:
    nxt = int(ids[i + 1]) if i + 1 < n else None
    if (1 <= i < n - 1 and tok.is_word_start(int(ids[i])) and nxt is not None
        and tok.is_word_start(nxt) and tok.id_to_token(int(ids[i])).strip("▁").isalpha()):
      return i
  return None


def fill_mask_examples(model, corpus: Corpus, n: int, *, max_seq_len: int,
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


def greedy_continue(model, prompt_BP: np.ndarray, new_tokens: int) -> np.ndarray:
  """Greedy decoding by full forward passes (no KV cache): [B, P] -> [B, new_tokens].

  One fixed-shape buffer of P + new_tokens tokens; causal attention means the unfilled
  tail never affects the position being predicted, so every step reuses one program.
  """
  B, P = prompt_BP.shape
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids_BT):
    m = nnx.merge(graphdef, state)

    def step(t, ids_BT):
      logits_BTV = m(ids_BT).logits
      next_B = jnp.argmax(jax.lax.dynamic_index_in_dim(logits_BTV, t - 1, 1, False), -1)
      return ids_BT.at[:, t].set(next_B.astype(ids_BT.dtype))

    return jax.lax.fori_loop(P, P + new_tokens, step, ids_BT)

  ids_BT = np.zeros((B, P + new_tokens), np.int32)
  ids_BT[:, :P] = prompt_BP
  return np.asarray(run(state, jnp.asarray(ids_BT)))[:, P:]


def continuation_samples(model, corpus: Corpus, n: int, *, eod: int, prompt_tokens: int,
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
  for prompt, cont in zip(prompts, greedy_continue(model, np.stack(prompts), new_tokens)):
    cont = cont.tolist()
    cont = cont[:cont.index(eod)] if eod in cont else cont
    out.append({"prompt": tok.decode(prompt.tolist()), "continuation": tok.decode(cont)})
  return out


def greedy_seq2seq(model, batch, new_tokens: int, start_id: int) -> np.ndarray:
  """Greedy decoding of an encoder-decoder by full forward passes: -> [B, new_tokens].
  As in `greedy_continue`, one fixed-shape decoder buffer serves every step."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids_BS, mask_BS, dec_BT):
    m = nnx.merge(graphdef, state)

    def step(t, dec_BT):
      logits_BTV = m(ids_BS, mask_BS, decoder_input_ids=dec_BT).logits
      next_B = jnp.argmax(jax.lax.dynamic_index_in_dim(logits_BTV, t, 1, False), -1)
      return dec_BT.at[:, t + 1].set(next_B.astype(dec_BT.dtype))

    return jax.lax.fori_loop(0, new_tokens, step, dec_BT)

  B = batch["input_ids"].shape[0]
  dec_BT = np.zeros((B, new_tokens + 1), np.int32)
  dec_BT[:, 0] = start_id
  out = run(state, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
            jnp.asarray(dec_BT))
  return np.asarray(out)[:, 1:]


def _span_text(ids, tok, sentinels, eos: int | None = None) -> str:
  """Text with sentinel ids spelled <extra_id_i> (they may lie past the tokenizer's
  vocabulary), cut at the first `eos` if given."""
  names = {int(s): f"<extra_id_{i}>" for i, s in enumerate(sentinels)}
  parts, run = [], []
  for i in (int(x) for x in ids):
    if i == eos:
      break
    if i in names:
      parts += [tok.decode(run), names[i]] if run else [names[i]]
      run = []
    else:
      run.append(i)
  if run:
    parts.append(tok.decode(run))
  return " ".join(p for p in parts if p)


def span_samples(model, corpus: Corpus, batch, n: int, sentinels) -> list[dict[str, Any]]:
  """The first `n` examples of a span-corruption batch: corrupted input, target spans and
  the model's greedy guess at them."""
  if n < 1:
    return []
  batch = {k: v[:n] for k, v in batch.items()}
  cfg, tok = model.config, corpus.tokenizer
  pred = greedy_seq2seq(model, batch, batch["targets"].shape[1], cfg.decoder_start_token_id)
  # Packed rows keep their end-of-document tokens (the same id as the final eos), so the
  # inputs and targets are cut by their masks; the model's guess at its first eos.
  n_in, n_out = batch["attention_mask"].sum(1) - 1, batch["loss_weights"].sum(1).astype(int) - 1
  return [{"input": _span_text(batch["input_ids"][i, :n_in[i]], tok, sentinels),
           "target": _span_text(batch["targets"][i, :n_out[i]], tok, sentinels),
           "prediction": _span_text(pred[i], tok, sentinels, cfg.eos_token_id)}
          for i in range(len(pred))]


def format_report(rep: dict[str, Any]) -> str:
  def g(k):
    v = rep.get(k)
    return "n/a" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.4g}")

  lines = [
      "== jaxlm report ==",
      f"params {g('params')} | tokens seen {g('tokens_seen')} | steps {g('steps')} | "
      f"wall {rep['wall_seconds']:.0f}s",
  ]
  if "samples" in rep:  # causal LM / span corruption
    lines += [
        f"val:  perplexity {g('val_perplexity')} (unigram baseline "
        f"{g('unigram_perplexity')}), next-token accuracy {g('val_accuracy')}",
        f"test: perplexity {g('test_perplexity')}, next-token accuracy {g('test_accuracy')}",
    ]
    for ex in rep["samples"]:
      if "prediction" in ex:
        lines.append(f"  {ex['input']}\n    target: {ex['target']}\n    model:  "
                     f"{ex['prediction']}")
      else:
        lines.append(f"  {ex['prompt']} >>> {ex['continuation']}")
    return "\n".join(lines)
  lines += [
      f"val:  MLM perplexity {g('val_mlm_perplexity')} (unigram baseline "
      f"{g('unigram_perplexity')}), MLM accuracy {g('val_mlm_accuracy')}, "
      f"NSP accuracy {g('val_nsp_accuracy')}",
      f"test: MLM perplexity {g('test_mlm_perplexity')}, MLM accuracy "
      f"{g('test_mlm_accuracy')}, NSP accuracy {g('test_nsp_accuracy')}",
  ]
  for ex in rep.get("fill_mask", []):
    guesses = ", ".join(f"{t} {p:.2f}" for t, p in ex["top5"])
    lines.append(f"  {ex['text']}\n    answer {ex['answer']!r}; top-5: {guesses}")
  return "\n".join(lines)
