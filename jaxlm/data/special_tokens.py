"""Which tokens of a ready-made tokenizer play the special roles (pad, unk, cls, ...).

Tokenizer files name their special tokens in different places, checked in this order:
1. `tokenizer_config.json` / `special_tokens_map.json` beside the file (what
   transformers reads): authoritative for every role they mention, even as null.
2. tokenizer.json itself: the model's `unk_token` / `unk_id`, and the post-processor
   (BertProcessing / RobertaProcessing name cls and sep; a TemplateProcessing
   `[X] $A [Y]` means cls X and sep Y, `[X] $A` a bos X, `$A [Y]` an eos Y).
3. Conventional spellings ("[PAD]", "<pad>", "<s>", "<|endoftext|>", ...).
A role nobody names is None.
"""

from __future__ import annotations

import json
import os
from typing import Callable

ROLES = ("pad", "unk", "cls", "sep", "mask", "bos", "eos")
SIDECARS = ("special_tokens_map.json", "tokenizer_config.json")  # later files win

# Conventional spellings, most specific first. GPT-2 style vocabularies use one
# "<|endoftext|>" for both bos and eos (as transformers' GPT-2 config does).
_NAMES = {
    "pad": ("[PAD]", "<pad>", "<|pad|>", "<|padding|>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
    "cls": ("[CLS]", "<cls>"),
    "sep": ("[SEP]", "<sep>"),
    "mask": ("[MASK]", "<mask>", "<|mask|>"),
    "bos": ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[BOS]", "<|endoftext|>"),
    "eos": ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "[EOS]"),
}

Lookup = Callable[[str], "int | None"]


def _token_text(value) -> str | None:
  """A sidecar entry: "tok", {"content": "tok", ...} (a serialized AddedToken) or null."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


def read_sidecars(directory: str) -> dict[str, str | None]:
  """Roles named by transformers' tokenizer configs in `directory` (role -> token text)."""
  named: dict[str, str | None] = {}
  for filename in SIDECARS:
    path = os.path.join(directory, filename)
    if not os.path.isfile(path):
      continue
    try:
      with open(path, encoding="utf-8") as f:
        d = json.load(f)
    except (OSError, ValueError):
      continue  # a broken optional file must not hide the tokenizer itself
    if isinstance(d, dict):
      for role in ROLES:
        if f"{role}_token" in d:
          named[role] = _token_text(d[f"{role}_token"])
  return named


def _from_post_processor(pp: dict | None, out: dict[str, str]) -> None:
  if not isinstance(pp, dict):
    return
  kind = pp.get("type")
  if kind == "Sequence":
    for sub in pp.get("processors", []):
      _from_post_processor(sub, out)
  elif kind in ("BertProcessing", "RobertaProcessing"):
    out.setdefault("cls", pp["cls"][0])
    out.setdefault("sep", pp["sep"][0])
  elif kind == "TemplateProcessing":
    items = pp.get("single", [])
    a = next((i for i, x in enumerate(items) if "Sequence" in x), None)
    if a is None:
      return
    before = [x["SpecialToken"]["id"] for x in items[:a] if "SpecialToken" in x]
    after = [x["SpecialToken"]["id"] for x in items[a + 1:] if "SpecialToken" in x]
    if before and after:
      out.setdefault("cls", before[0])
      out.setdefault("sep", after[-1])
    elif before:
      out.setdefault("bos", before[0])
    elif after:
      out.setdefault("eos", after[-1])


def roles_from_tokenizer_json(spec: dict) -> tuple[dict[str, str], int | None]:
  """Roles that a tokenizer.json states itself: (role -> token text, Unigram unk id)."""
  out: dict[str, str] = {}
  model = spec.get("model") or {}
  if isinstance(model.get("unk_token"), str):
    out["unk"] = model["unk_token"]
  _from_post_processor(spec.get("post_processor"), out)
  unk_id = model.get("unk_id") if model.get("type") == "Unigram" else None
  return out, unk_id


def resolve(lookup: Lookup, *, named: dict[str, str | None] | None = None,
            stated: dict[str, str] | None = None,
            ids: dict[str, int | None] | None = None) -> dict[str, int | None]:
  """Role -> id. `named`: sidecar roles (final, even None); `stated`: roles the file
  states by text; `ids`: roles the backend states by id; then conventional names."""
  named, stated, ids = named or {}, stated or {}, ids or {}
  out: dict[str, int | None] = {}
  for role in ROLES:
    if role in named:
      out[role] = lookup(named[role]) if named[role] is not None else None
    elif role in stated and lookup(stated[role]) is not None:
      out[role] = lookup(stated[role])
    elif ids.get(role) is not None:
      out[role] = ids[role]
    else:
      out[role] = next((i for i in map(lookup, _NAMES[role]) if i is not None), None)
  return out
