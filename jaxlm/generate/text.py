"""Text in, text out, in batches: `complete` encodes prompts, left-pads them to one shape,
generates and decodes each answer up to the end token. Instruction tuning (tasks/sft.py)
scores its answers with it, and the RAG pipeline answers with it, so both see prompts
laid out the same way (the prompt, then "\\n", as the SFT task trains)."""

from __future__ import annotations

import numpy as np

from jaxlm.generate.decode import generate


def complete(model, tok, prompts: list[str], *, eos: int, max_new_tokens: int,
             max_prompt: int, batch_size: int = 32, suffix: str = "\n",
             **sampling) -> list[str]:
  """Answers to `prompts` (each + `suffix`; longer ones keep their last `max_prompt`
  tokens), cut at `eos`. Every batch is [batch_size, max_prompt], so one compile serves
  all; `sampling`: generate's keyword arguments (default greedy)."""
  out = []
  pad = tok.pad_id if tok.pad_id is not None else 0
  for start in range(0, len(prompts), batch_size):
    chunk = [ids[-max_prompt:] for ids in tok.encode_batch(
        [p + suffix for p in prompts[start:start + batch_size]])]
    P = max_prompt
    ids = np.full((batch_size, P), pad, np.int32)
    mask = np.zeros((batch_size, P), np.int32)
    for i, row in enumerate(chunk):
      ids[i, P - len(row):], mask[i, P - len(row):] = row, 1
    mask[len(chunk):, -1] = 1  # filler rows: one token, dropped below
    gen = np.asarray(generate(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                              eos_token_id=eos, pad_token_id=pad, **sampling))[:, P:]
    for row in gen[:len(chunk)].tolist():
      out.append(tok.decode(row[:row.index(eos)] if eos in row else row).strip())
  return out
