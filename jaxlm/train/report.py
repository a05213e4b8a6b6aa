"""The end-of-run report: headline numbers and fill-mask examples from the test split."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


def format_report(rep: dict[str, Any]) -> str:
  def g(k):
    v = rep.get(k)
    return "n/a" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.4g}")

  lines = [
      "== jaxlm report ==",
      f"params {g('params')} | tokens seen {g('tokens_seen')} | steps {g('steps')} | "
      f"wall {rep['wall_seconds']:.0f}s",
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
