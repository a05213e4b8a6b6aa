"""Collect, clean, split, build the vocabulary and tokenize: a corpus on disk.

`prepare_corpus` streams documents once and writes, per split, a flat token file plus
line and document offsets, read back through memory maps. Everything is staged in a
temporary directory and moved into the workdir only when it succeeded, so bad input
leaves the workdir untouched. A workdir prepared earlier is reused when its manifest
matches the settings, which is what a resumed run needs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from typing import Any, Iterator

import numpy as np

from jaxlm.data import clean, sources
from jaxlm.data.tokenizer import Tokenizer, train_tokenizer
from jaxlm.errors import ConfigError, DataError

SPLITS = ("train", "validation", "test")
MANIFEST = "manifest.json"


@dataclasses.dataclass
class TokenizedSplit:
  """Token ids of one split: line i is tokens[line_offsets[i]:line_offsets[i+1]], and
  document d spans lines doc_lines[d]:doc_lines[d+1]."""

  tokens: np.ndarray
  line_offsets: np.ndarray
  doc_lines: np.ndarray

  @classmethod
  def load(cls, directory: str, split: str) -> TokenizedSplit:
    meta = np.load(os.path.join(directory, f"{split}.index.npz"))
    dtype = np.dtype(str(meta["dtype"]))
    path = os.path.join(directory, f"{split}.tokens.bin")
    tokens = (np.memmap(path, dtype=dtype, mode="r") if os.path.getsize(path)
              else np.zeros(0, dtype))
    return cls(tokens, meta["line_offsets"], meta["doc_lines"])

  @property
  def num_docs(self) -> int:
    return len(self.doc_lines) - 1

  @property
  def num_tokens(self) -> int:
    return int(self.line_offsets[-1])

  def line(self, i: int) -> np.ndarray:
    return self.tokens[self.line_offsets[i]:self.line_offsets[i + 1]]

  def chunks(self, max_tokens: int) -> np.ndarray:
    """Greedy runs of whole lines of at most `max_tokens` tokens, never crossing a
    document: rows of (doc, first_line, end_line)."""
    rows = []
    lengths = np.diff(self.line_offsets)
    for d in range(self.num_docs):
      start, total = self.doc_lines[d], 0
      for i in range(self.doc_lines[d], self.doc_lines[d + 1]):
        if total and total + lengths[i] > max_tokens:
          rows.append((d, start, i))
          start, total = i, 0
        total += lengths[i]
      if total:
        rows.append((d, start, self.doc_lines[d + 1]))
    return np.asarray(rows, np.int64).reshape(-1, 3)


@dataclasses.dataclass
class Corpus:
  directory: str
  tokenizer: Tokenizer
  splits: dict[str, TokenizedSplit]
  manifest: dict[str, Any]

  def unigram_log_probs(self) -> np.ndarray:
    """Add-one smoothed unigram model of the training tokens: log p(token) [V]."""
    counts = np.bincount(self.splits["train"].tokens, minlength=self.tokenizer.vocab_size)
    counts = counts.astype(np.float64) + 1.0
    return np.log(counts / counts.sum())


def _settings(data_cfg, tok_cfg) -> dict[str, Any]:
  """The settings a prepared corpus depends on (compared on reuse)."""
  data = data_cfg.to_dict()
  return {"data": {k: data[k] for k in ("source", "split", "clean", "text_key", "tfds_split")},
          "tokenizer": tok_cfg.to_dict()}


def clean_options(data_cfg) -> clean.CleanOptions:
  try:
    return clean.CleanOptions(**dict(data_cfg.clean))
  except TypeError as e:
    raise ConfigError(f"data.clean: {e}") from None


def load_corpus(directory: str) -> Corpus:
  with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
    manifest = json.load(f)
  tok = Tokenizer.load(os.path.join(directory, manifest["tokenizer_file"]))
  splits = {s: TokenizedSplit.load(directory, s) for s in SPLITS}
  return Corpus(directory, tok, splits, manifest)


def prepare_corpus(data_cfg, tok_cfg, directory: str, *, log=print) -> Corpus:
  """Returns the corpus in `directory`, building it first unless it already exists."""
  settings = json.loads(json.dumps(_settings(data_cfg, tok_cfg)))
  manifest_path = os.path.join(directory, MANIFEST)
  if os.path.exists(manifest_path):
    with open(manifest_path, encoding="utf-8") as f:
      old = json.load(f)["settings"]
    for section in settings:
      for key in sorted(set(settings[section]) | set(old.get(section, {}))):
        if settings[section].get(key) != old.get(section, {}).get(key):
          raise ConfigError(
              f"{section}.{key}: the workdir's corpus at {directory} was prepared with "
              f"{old.get(section, {}).get(key)!r}, not {settings[section].get(key)!r}; "
              "use a new --workdir")
    return load_corpus(directory)
  sources.check_source(data_cfg.source)
  stage = tempfile.mkdtemp(prefix="jaxlm-corpus-")
  try:
    manifest = _build(data_cfg, tok_cfg, stage, log)
    manifest["settings"] = settings
    with open(os.path.join(stage, MANIFEST), "w", encoding="utf-8") as f:
      json.dump(manifest, f, indent=2)
    os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
    shutil.move(stage, directory)
  finally:
    shutil.rmtree(stage, ignore_errors=True)
  return load_corpus(directory)


def _write_documents(data_cfg, stage: str) -> dict[str, Any]:
  """Streams, cleans and splits documents into `<split>.jsonl` files."""
  opts = clean_options(data_cfg)
  fractions = tuple(data_cfg.split)
  files = {s: open(os.path.join(stage, f"{s}.jsonl"), "w", encoding="utf-8") for s in SPLITS}
  stats = {"read": 0, "dropped": 0, **{f"docs_{s}": 0 for s in SPLITS}}
  try:
    docs = sources.iter_documents(data_cfg.source, text_key=data_cfg.text_key,
                                  tfds_split=data_cfg.tfds_split)
    for doc in docs:
      stats["read"] += 1
      text = clean.clean_text(doc.text, opts)
      if not clean.keep_document(text, opts):
        stats["dropped"] += 1
        continue
      split = clean.split_of(text, fractions)
      stats[f"docs_{split}"] += 1
      files[split].write(json.dumps({"text": text, "id": doc.doc_id, "label": doc.label}) + "\n")
  finally:
    for f in files.values():
      f.close()
  kept = sum(stats[f"docs_{s}"] for s in SPLITS)
  if kept == 0:
    raise DataError(
        f"data.source {data_cfg.source!r}: empty corpus ({stats['read']} documents read, "
        f"{stats['dropped']} dropped as shorter than data.clean.min_chars={opts.min_chars})")
  for s in SPLITS:
    if stats[f"docs_{s}"] == 0:
      raise DataError(
          f"data.source {data_cfg.source!r}: the {s} split is empty ({kept} documents kept); "
          "add documents or change data.split")
  return stats


def _iter_split(stage: str, split: str) -> Iterator[dict[str, Any]]:
  with open(os.path.join(stage, f"{split}.jsonl"), encoding="utf-8") as f:
    for line in f:
      yield json.loads(line)


def _lines(text: str) -> list[str]:
  return [ln for ln in (x.strip() for x in text.split("\n")) if ln]


def _tokenize_split(tok: Tokenizer, stage: str, split: str, batch_lines: int = 4096) -> int:
  """Writes `<split>.tokens.bin` and `<split>.index.npz`; returns the token count."""
  dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
  line_offsets, doc_lines = [0], [0]
  pending: list[str] = []
  with open(os.path.join(stage, f"{split}.tokens.bin"), "wb") as out:

    def flush():
      for ids in tok.encode_batch(pending):
        out.write(np.asarray(ids, dtype).tobytes())
        line_offsets.append(line_offsets[-1] + len(ids))
      pending.clear()

    for doc in _iter_split(stage, split):
      lines = _lines(doc["text"])
      pending.extend(lines)
      doc_lines.append(doc_lines[-1] + len(lines))
      if len(pending) >= batch_lines:
        flush()
    flush()
  np.savez(os.path.join(stage, f"{split}.index.npz"), dtype=np.dtype(dtype).name,
           line_offsets=np.asarray(line_offsets, np.int64),
           doc_lines=np.asarray(doc_lines, np.int64))
  return line_offsets[-1]


def _build(data_cfg, tok_cfg, stage: str, log) -> dict[str, Any]:
  t0 = time.time()
  stats = _write_documents(data_cfg, stage)
  log(f"corpus: {stats['read']} documents read, {stats['dropped']} dropped; "
      + ", ".join(f"{s} {stats['docs_' + s]}" for s in SPLITS))
  if tok_cfg.path:
    tok = Tokenizer.load(tok_cfg.path)
  else:
    train_lines = (ln for doc in _iter_split(stage, "train") for ln in _lines(doc["text"]))
    tok = train_tokenizer(train_lines, kind=tok_cfg.kind, vocab_size=tok_cfg.vocab_size,
                          model_type=tok_cfg.model_type, lowercase=tok_cfg.lowercase,
                          seed=tok_cfg.seed)
  tok_file = os.path.basename(tok.save(stage))
  log(f"tokenizer: {tok.kind}, {tok.vocab_size} tokens ({time.time() - t0:.1f}s so far)")
  for s in SPLITS:
    stats[f"tokens_{s}"] = _tokenize_split(tok, stage, s)
  stats.update(tokenizer_file=tok_file, vocab_size=tok.vocab_size,
               prepare_seconds=round(time.time() - t0, 2))
  log("tokenized: " + ", ".join(f"{s} {stats['tokens_' + s]:,}" for s in SPLITS)
      + f" tokens ({stats['prepare_seconds']}s)")
  return stats
