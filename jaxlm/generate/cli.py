"""`python -m jaxlm.main --mode=generate`: text in, text out.

The model and tokenizer come from `--config.model.init_from=DIR` (a Hugging Face or
jaxlm directory with a tokenizer) or from the workdir's export (`WORKDIR/model`, what a
training run writes). Nothing in the workdir is written or locked.

  --prompt="..."         one prompt; on a terminal its tokens stream as they come
  --prompts_file=FILE    one prompt a line, or JSONL with a "prompt" field; runs in batches
                         of generate.batch_size and writes JSONL to --output (or stdout)

Sampling comes from the config's `generate` section (generate.max_new_tokens,
generate.temperature, generate.top_k, ...); generate.quantize=int8|int4|bf16 quantizes
the weights after loading (generate.quantize_group_size for int4; jaxlm.quantize).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Iterable

from tqdm import tqdm

from jaxlm import experiment
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.errors import ConfigError, DataError
from jaxlm.generate.decode import generate, stream
from jaxlm.generate.request import check_model
from jaxlm.pretrained import from_pretrained


def sampling_kwargs(g) -> dict:
  """generate.* config keys as `generate` keyword arguments (0 / 1.0 mean "off")."""
  return dict(temperature=g.temperature, top_k=g.top_k or None,
              top_p=g.top_p if g.top_p != 1.0 else None, min_p=g.min_p or None,
              repetition_penalty=(g.repetition_penalty if g.repetition_penalty != 1.0
                                  else None), seed=g.seed)


def read_prompts(path: str) -> list[str]:
  """Prompts of a file: JSONL objects with a "prompt" field, or one prompt a line."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = [ln.rstrip("\n") for ln in f if ln.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"--prompts_file: cannot read {path} ({e})") from None
  if not lines:
    raise DataError(f"--prompts_file: {path} holds no prompts")
  if not lines[0].lstrip().startswith("{"):
    return lines
  out = []
  for i, ln in enumerate(lines, 1):
    try:
      rec = json.loads(ln)
    except json.JSONDecodeError as e:
      raise DataError(f"--prompts_file: {path}:{i}: invalid JSON ({e.msg})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
      raise DataError(f"--prompts_file: {path}:{i}: no string \"prompt\" field")
    out.append(rec["prompt"])
  return out


def load(cfg, workdir: str):
  """(model, tokenizer, directory) for --mode=generate."""
  directory = cfg.model.init_from or os.path.join(workdir, "model")
  if not os.path.isdir(directory):
    raise ConfigError(f"--workdir {workdir} has no exported model ({directory}); train "
                      "first, or set --config.model.init_from=DIR")
  g = cfg.generate
  model, tok = open_model(directory, runtime=experiment.runtime(cfg), quantize=g.quantize,
                          group_size=g.quantize_group_size, flag="generate.quantize")
  return model, tok, directory


def open_model(directory: str, *, runtime=None, quantize: str | None = None,
               group_size: int = 128, flag: str = "quantize"):
  """(a generating model, its tokenizer) from an HF or jaxlm directory; `quantize`
  (int8|int4|bf16) quantizes the weights after loading. `flag` names the option in
  errors."""
  model = from_pretrained(directory, runtime=runtime)
  check_model(model)
  if quantize:
    from jaxlm.compress.quantize import quantize as quantize_model  # only when asked
    try:
      model = quantize_model(model, quantize, group_size)
    except ConfigError as e:
      raise ConfigError(f"{flag}={quantize!r} ({flag}_group_size={group_size}): {e}") from None
  names = os.listdir(directory)
  if not any(n in ("tokenizer.json", "vocab.txt", "vocab.json") or n.endswith(".model")
             for n in names):
    raise DataError(f"no tokenizer in {directory} (tokenizer.json, *.model, vocab.txt or "
                    "vocab.json + merges.txt)")
  return model, Tokenizer.load(directory)  # a broken one is its own one-line error


def _encode(tok: Tokenizer, texts: Iterable[str]) -> list[list[int]]:
  out = []
  for t in texts:
    ids = tok.encode(t)
    if not ids:
      raise DataError(f"prompt {t[:40]!r} encodes to no tokens")
    out.append(ids)
  return out


def _batch(ids_list: list[list[int]], pad: int):
  import numpy as np  # noqa: PLC0415
  P = max(len(x) for x in ids_list)
  ids = np.full((len(ids_list), P), pad, np.int32)
  mask = np.zeros((len(ids_list), P), np.int32)
  for b, x in enumerate(ids_list):
    ids[b, P - len(x):], mask[b, P - len(x):] = x, 1
  return ids, mask


def run(cfg, workdir: str, *, prompt: str | None, prompts_file: str | None,
        output: str | None) -> None:
  if (prompt is None) == (prompts_file is None):
    raise ConfigError("--mode=generate needs exactly one of --prompt or --prompts_file")
  g = cfg.generate
  if g.batch_size < 1 or g.max_new_tokens < 1:
    raise ConfigError("generate.batch_size and generate.max_new_tokens must be >= 1")
  model, tok, _ = load(cfg, workdir)
  prompts = [prompt] if prompt is not None else read_prompts(prompts_file)
  kw = dict(max_new_tokens=g.max_new_tokens, **sampling_kwargs(g))
  pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
  encoded = _encode(tok, prompts)
  if prompt is not None and output is None and sys.stdout.isatty():
    _stream_one(model, tok, encoded[0], pad, kw)
    return
  out = open(output, "w", encoding="utf-8") if output else sys.stdout  # noqa: SIM115
  try:
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", file=sys.stderr,
               disable=len(prompts) == 1)
    for start in range(0, len(prompts), g.batch_size):
      chunk = encoded[start:start + g.batch_size]
      ids, mask = _batch(chunk, pad)
      tokens = generate(model, ids, attention_mask=mask, **kw)
      for i, row in enumerate(tokens):
        new = row[ids.shape[1]:] if not hasattr(model, "encode") else row[1:]
        out.write(json.dumps({"prompt": prompts[start + i],
                              "completion": tok.decode(new.tolist()),
                              "tokens": new.tolist()}) + "\n")
      out.flush()
      bar.update(len(chunk))
    bar.close()
  finally:
    if output:
      out.close()


def _stream_one(model, tok, ids: list[int], pad: int, kw: dict) -> None:
  """Prints the completion as it is produced."""
  ids_arr, mask = _batch([ids], pad)
  eos = model.config.eos_token_id
  eos = set(eos if isinstance(eos, list) else [eos])
  new, shown = [], ""
  for step in stream(model, ids_arr, attention_mask=mask, **kw):
    token = int(step[0])
    if token in eos:
      break
    new.append(token)
    text = tok.decode(new)
    sys.stdout.write(text[len(shown):])
    sys.stdout.flush()
    shown = text
  sys.stdout.write("\n")
