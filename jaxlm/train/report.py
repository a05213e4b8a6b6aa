"""The end-of-run report: headline numbers, and examples from the test split: fill-mask
guesses (BERT) or greedy continuations of document openings (causal LM)."""

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


def format_report(rep: dict[str, Any]) -> str:
  def g(k):
    v = rep.get(k)
    return "n/a" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.4g}")

  lines = [
      "== jaxlm report ==",
      f"params {g('params')} | tokens seen {g('tokens_seen')} | steps {g('steps')} | "
      f"wall {rep['wall_seconds']:.0f}s",
  ]
  if "samples" in rep:  # causal LM
    lines += [
        f"val:  perplexity {g('val_perplexity')} (unigram baseline "
        f"{g('unigram_perplexity')}), next-token accuracy {g('val_accuracy')}",
        f"test: perplexity {g('test_perplexity')}, next-token accuracy {g('test_accuracy')}",
    ]
    lines += [f"  {ex['prompt']} >>> {ex['continuation']}" for ex in rep["samples"]]
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
