"""Subword tokenizers: an HF `tokenizers` backend (WordPiece, BPE, Unigram, ...) or
SentencePiece.

Tokenizers we train (WordPiece or SentencePiece) give the special tokens the same
ids, 0..4 (`SPECIAL_TOKENS`). Ready-made ones load through one call,
`load_tokenizer(path)`: any HF tokenizer.json (GPT-2/Llama BPE, Unigram, WordPiece), a
SentencePiece *.model or a BERT vocab.txt; their special ids are read from the files
(`jaxlm.data.special_tokens`) and are None where a role does not exist. Files are JSON,
SentencePiece protobuf or plain text; nothing is ever unpickled.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import (AddedToken, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)

from jaxlm.data import special_tokens
from jaxlm.errors import ConfigError, DataError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD, UNK, CLS, SEP, MASK = SPECIAL_TOKENS
KINDS = ("wordpiece", "sentencepiece")
SPM_MODEL_TYPES = ("unigram", "bpe")
HF_FILE = "tokenizer.json"
WORDPIECE_FILE = HF_FILE  # what trained WordPiece tokenizers are saved as
_HF_CONFIG_FILE = "tokenizer_config.json"  # transformers' sidecar: class + special tokens
SPM_FILE = "spm.model"
GPT2_VOCAB_FILE, GPT2_MERGES_FILE = "vocab.json", "merges.txt"  # GPT-2's pre-tokenizer.json files
GPT2_EOT = "<|endoftext|>"
BERT_VOCAB_FILE = "vocab.txt"

_PREFIX = "##"  # WordPiece continuing-subword prefix
_SPM_SPACE = "\u2581"  # "▁": SentencePiece's word-boundary marker
_SPACE_MARKERS = {"ByteLevel": "\u0120", "Metaspace": _SPM_SPACE}  # "Ġ" (GPT-2), "▁"
# Unigram training depends on the thread count, so it is fixed for reproducibility.
_SPM_THREADS = 8
# SentencePiece holds its training sentences in memory; beyond this many lines
# the rest of the corpus is not read (deterministically the first lines).
_SPM_MAX_SENTENCES = 2_000_000
_SPM_MAX_LINE_CHARS = 4000  # spm silently skips lines over 4192 bytes; we split them


class Tokenizer:
  """Uniform interface over an HF `tokenizers` or a SentencePiece backend.

  `kind` is "sentencepiece" or the HF model type in lower case ("wordpiece", "bpe",
  "unigram", "wordlevel"). `pad_id`, `unk_id`, `cls_id`, `sep_id`, `mask_id`, `bos_id`
  and `eos_id` are None where the tokenizer has no such token; `require` checks them.
  """

  def __init__(self, backend: HFTokenizer | spm.SentencePieceProcessor, *,
               source: str = "<memory>", named_tokens: dict[str, str | None] | None = None):
    """`named_tokens` (role -> token text or None, as in transformers' tokenizer_config)
    overrides the roles found in the backend itself."""
    if isinstance(backend, HFTokenizer):
      self._hf = backend
      self.kind = type(backend.model).__name__.lower()
      # Literal "[MASK]" in data is plain text (as with SentencePiece control
      # symbols); use encode(..., parse_special=True) to get the special ids.
      self._hf.encode_special_tokens = True
      spec = json.loads(backend.to_str())
      stated, unk_id = special_tokens.roles_from_tokenizer_json(spec)
      found = special_tokens.resolve(backend.token_to_id, named=named_tokens, stated=stated,
                                     ids={"unk": unk_id})
      special = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
      self._marker = _space_marker(spec)
    elif isinstance(backend, spm.SentencePieceProcessor):
      self._sp = backend
      self.kind = "sentencepiece"
      ids = {"pad": backend.pad_id(), "unk": backend.unk_id(), "bos": backend.bos_id(),
             "eos": backend.eos_id()}
      found = special_tokens.resolve(self._spm_piece_id, named=named_tokens, ids={
          k: (v if v >= 0 else None) for k, v in ids.items()})
      special = {backend.id_to_piece(i): i for i in range(backend.get_piece_size())
                 if backend.is_control(i) or backend.is_unknown(i)}
    else:
      raise TypeError(f"unsupported tokenizer backend {type(backend).__name__}")
    self.source = source
    self._roles = found
    for i in self._roles.values():
      if i is not None:
        special[self.id_to_token(i)] = i
    self._special = special  # token text -> id, for parse_special
    self._special_re = (re.compile("(" + "|".join(
        re.escape(t) for t in sorted(special, key=len, reverse=True)) + ")")
                        if special else None)
    self.special_ids = frozenset(special.values())

  def __repr__(self) -> str:
    return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, source={self.source!r})"

  # ---- vocabulary ------------------------------------------------------------------------
  @functools.cached_property
  def vocab_size(self) -> int:
    if self.kind != "sentencepiece":
      return self._hf.get_vocab_size(with_added_tokens=True)
    return self._sp.get_piece_size()

  pad_id = property(lambda self: self._roles["pad"])
  unk_id = property(lambda self: self._roles["unk"])
  cls_id = property(lambda self: self._roles["cls"])
  sep_id = property(lambda self: self._roles["sep"])
  mask_id = property(lambda self: self._roles["mask"])
  bos_id = property(lambda self: self._roles["bos"])
  eos_id = property(lambda self: self._roles["eos"])

  def require(self, *roles: str) -> None:
    """Raises DataError naming the roles (e.g. "mask") this tokenizer has no token for."""
    missing = [r for r in roles if self._roles[r] is None]
    if missing:
      raise DataError(f"{self.source}: tokenizer has no {', '.join(missing)} token "
                      f"(needed here); ids: {self._roles}")

  def id_to_token(self, i: int) -> str:
    i = int(i)
    if not 0 <= i < self.vocab_size:
      raise IndexError(f"token id {i} out of range [0, {self.vocab_size})")
    return self._hf.id_to_token(i) if self.kind != "sentencepiece" else self._sp.id_to_piece(i)

  def token_to_id(self, token: str) -> int | None:
    if self.kind != "sentencepiece":
      return self._hf.token_to_id(token)
    return self._spm_piece_id(token)

  def _spm_piece_id(self, piece: str) -> int | None:
    i = self._sp.piece_to_id(piece)
    # piece_to_id answers unk_id for unknown pieces; tell them apart.
    return i if 0 <= i < self._sp.get_piece_size() and self._sp.id_to_piece(i) == piece else None

  def is_word_start(self, i: int) -> bool:
    """True if token `i` begins a new word (for whole-word masking); False for specials."""
    return bool(self.word_start_mask[int(i)])

  @functools.cached_property
  def word_start_mask(self) -> np.ndarray:
    """bool[vocab_size]: `is_word_start` for every id, for vectorized masking.

    WordPiece marks continuations ("##ing"); SentencePiece, GPT-2 byte-level BPE and
    Metaspace vocabularies mark word starts ("▁the", "Ġthe"). A vocabulary with neither
    treats every token as a word start.
    """
    mask = np.zeros(self.vocab_size, dtype=bool)
    for i in range(self.vocab_size):
      if i in self.special_ids:
        continue
      if self.kind == "sentencepiece":
        mask[i] = self._sp.id_to_piece(i).startswith(_SPM_SPACE) and not self._sp.is_byte(i)
        continue
      token = self._hf.id_to_token(i)
      if token is None:
        continue
      if self.kind == "wordpiece":
        mask[i] = not token.startswith(self._hf.model.continuing_subword_prefix)
      else:
        mask[i] = self._marker is None or token.startswith(self._marker)
    return mask

  # ---- encoding ----------------------------------------------------------------------------
  def encode(self, text: str, *, parse_special: bool = False) -> list[int]:
    """Token ids of `text`, no specials added.

    With parse_special=True, literal "[MASK]", "[SEP]", ... in `text` become
    their special ids (for fill-mask prompts); otherwise they are plain text.
    """
    if parse_special and self._special_re is not None:
      ids: list[int] = []
      for part in self._special_re.split(text):
        ids.extend([self._special[part]] if part in self._special else self._encode(part))
      return ids
    return self._encode(text)

  def _encode(self, text: str) -> list[int]:
    if not text:
      return []
    if self.kind != "sentencepiece":
      return self._hf.encode(text, add_special_tokens=False).ids
    return self._sp.encode(text, out_type=int)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Batched `encode` (parallel inside the backend)."""
    texts = list(texts)
    if not texts:
      return []
    if self.kind != "sentencepiece":
      return [e.ids for e in self._hf.encode_batch_fast(texts, add_special_tokens=False)]
    return self._sp.encode(texts, out_type=int)

  def batch_decode(self, rows: Iterable[Iterable[int]], *, skip_special: bool = True
                   ) -> list[str]:
    """`decode` of each row (e.g. the output of jaxlm.generate)."""
    return [self.decode([int(i) for i in row], skip_special=skip_special) for row in rows]

  def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
    """Text of `ids`; special tokens are dropped unless skip_special=False."""
    ids = [int(i) for i in ids]
    if self.kind != "sentencepiece":
      return self._hf.decode(ids, skip_special_tokens=skip_special)
    if skip_special:
      return self._sp.decode([i for i in ids if i not in self.special_ids])
    # SentencePiece decodes control symbols to "", so spell them out ourselves.
    parts, run = [], []
    for i in ids:
      if i in self.special_ids:
        parts += [self._sp.decode(run), self._sp.id_to_piece(i)]
        run = []
      else:
        run.append(i)
    parts.append(self._sp.decode(run))
    return " ".join(p for p in parts if p)

  # ---- files -------------------------------------------------------------------------------
  def save(self, directory: str) -> str:
    """Writes tokenizer.json (HF backends) or spm.model (sentencepiece); returns the path.

    HF backends also get a tokenizer_config.json naming the generic fast tokenizer and
    the special tokens: without it transformers picks a class from the model's
    config.json (BertTokenizer, which lowercases) instead of using tokenizer.json as is.
    """
    os.makedirs(directory, exist_ok=True)
    if self.kind != "sentencepiece":
      path = os.path.join(directory, HF_FILE)
      self._hf.save(path)
      sidecar = {"tokenizer_class": "PreTrainedTokenizerFast"}
      sidecar.update({f"{role}_token": self.id_to_token(i)
                      for role, i in self._roles.items() if i is not None})
      with open(os.path.join(directory, _HF_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(sidecar, f, indent=2, sort_keys=True)
    else:
      path = os.path.join(directory, SPM_FILE)
      with open(path, "wb") as f:
        f.write(self._sp.serialized_model_proto())
    return path

  @classmethod
  def load(cls, path: str, *, lowercase: bool | None = None) -> Tokenizer:
    """Loads tokenizer.json (any HF model type), a SentencePiece *.model or a BERT vocab.txt.

    `path` may be the file or a directory holding one (tried in that order). Special
    tokens named by a transformers tokenizer_config.json / special_tokens_map.json in
    the same directory take precedence over what the file itself says.
    `lowercase` only applies to vocab.txt (default: the config's `do_lower_case`, else
    False; use True for uncased BERT vocabularies).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
      path = _find_in_directory(path)
    if not os.path.isfile(path):
      raise DataError(f"tokenizer: no such file or directory: {path!r}")
    name, directory = os.path.basename(path), os.path.dirname(path)
    named = special_tokens.read_sidecars(directory)
    if name == GPT2_VOCAB_FILE:
      return cls(_load_gpt2_bpe(path), source=path, named_tokens=named)
    if name.endswith(".json"):
      return cls(_load_hf_json(path), source=path, named_tokens=named)
    if name.endswith(".model"):
      return cls(_load_spm(path), source=path, named_tokens=named)
    if name.endswith(".txt"):
      if lowercase is None:
        lowercase = bool(_sidecar_config(directory).get("do_lower_case", False))
      return cls(_load_bert_vocab(path, lowercase), source=path, named_tokens=named)
    raise DataError(f"{path}: unknown tokenizer file type (expected tokenizer.json, "
                    "*.model or vocab.txt)")


def load_tokenizer(path: str, *, lowercase: bool | None = None) -> Tokenizer:
  """The tokenizer in `path` (a file, or a directory holding tokenizer.json, a SentencePiece
  *.model or vocab.txt), whatever model type it is. See `Tokenizer.load`."""
  return Tokenizer.load(path, lowercase=lowercase)


def _find_in_directory(directory: str) -> str:
  for name in (WORDPIECE_FILE, SPM_FILE, BERT_VOCAB_FILE):
    if os.path.isfile(os.path.join(directory, name)):
      return os.path.join(directory, name)
  if all(os.path.isfile(os.path.join(directory, n)) for n in (GPT2_VOCAB_FILE, GPT2_MERGES_FILE)):
    return os.path.join(directory, GPT2_VOCAB_FILE)
  models_found = sorted(n for n in os.listdir(directory) if n.endswith(".model"))
  if len(models_found) == 1:
    return os.path.join(directory, models_found[0])
  raise DataError(f"{directory}: no {WORDPIECE_FILE}, {SPM_FILE}, {BERT_VOCAB_FILE}, "
                  f"{GPT2_VOCAB_FILE} + {GPT2_MERGES_FILE} or single *.model tokenizer file "
                  "in directory")


def _read_bytes(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _read_text(path: str) -> str:
  try:
    return _read_bytes(path).decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not valid UTF-8 at byte offset {e.start}") from None


def _sidecar_config(directory: str) -> dict:
  path = os.path.join(directory, _HF_CONFIG_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except (OSError, ValueError):
    return {}
  return d if isinstance(d, dict) else {}


def _load_hf_json(path: str) -> HFTokenizer:
  text = _read_text(path)
  try:
    model = json.loads(text).get("model")
  except (json.JSONDecodeError, AttributeError):
    raise DataError(f"{path}: not a valid tokenizer.json") from None
  if not isinstance(model, dict) or "type" not in model:
    raise DataError(f"{path}: not a valid tokenizer.json (no model type)")
  try:
    return HFTokenizer.from_str(text)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"{path}: invalid {model['type']} tokenizer.json "
                    f"({str(e).splitlines()[0]})") from None


def _load_gpt2_bpe(vocab_path: str) -> HFTokenizer:
  """GPT-2's original files (vocab.json + merges.txt, no tokenizer.json): the byte-level BPE
  that transformers' GPT2TokenizerFast builds from them, with <|endoftext|> special."""
  merges_path = os.path.join(os.path.dirname(vocab_path), GPT2_MERGES_FILE)
  if not os.path.isfile(merges_path):
    raise DataError(f"{vocab_path}: a GPT-2 vocab.json needs {GPT2_MERGES_FILE} beside it")
  try:
    vocab = json.loads(_read_text(vocab_path))
  except json.JSONDecodeError as e:
    raise DataError(f"{vocab_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
  if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
    raise DataError(f"{vocab_path}: not a GPT-2 vocab.json (token -> id)")
  merges = []
  for n, line in enumerate(_read_text(merges_path).splitlines(), 1):
    if not line.strip() or (n == 1 and line.startswith("#version")):
      continue
    parts = line.split(" ")
    if len(parts) != 2:
      raise DataError(f"{merges_path}: line {n} is not a merge of two tokens: {line[:40]!r}")
    merges.append((parts[0], parts[1]))
  tok = HFTokenizer(models.BPE(vocab, merges))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  if GPT2_EOT in vocab:
    tok.add_special_tokens([AddedToken(GPT2_EOT, special=True)])
  return tok


def _steps(part) -> list[dict]:
  """The steps of one pipeline component (normalizer, pre_tokenizer, decoder), flattened."""
  if not isinstance(part, dict):
    return []
  subs = part.get("normalizers") or part.get("pretokenizers") or part.get("decoders")
  return [step for sub in subs for step in _steps(sub)] if subs else [part]


def _space_marker(spec: dict) -> str | None:
  """The character that starts a word's first token ("Ġ", "▁"), if the pipeline has one."""
  for step in _steps(spec.get("pre_tokenizer")) + _steps(spec.get("decoder")):
    if step.get("type") in _SPACE_MARKERS:
      return step.get("replacement", _SPACE_MARKERS[step["type"]])
  # Llama-2 style: the normalizer itself writes "▁" for spaces.
  for step in _steps(spec.get("normalizer")):
    if _SPM_SPACE in json.dumps(step, ensure_ascii=False):
      return _SPM_SPACE
  return None


def _load_spm(path: str) -> spm.SentencePieceProcessor:
  raw = _read_bytes(path)
  try:
    return spm.SentencePieceProcessor(model_proto=raw)
  except Exception:  # pylint: disable=broad-except
    raise DataError(f"{path}: not a valid SentencePiece model") from None


def _load_bert_vocab(path: str, lowercase: bool) -> HFTokenizer:
  vocab: dict[str, int] = {}
  for token in _read_text(path).splitlines():
    vocab.setdefault(token, len(vocab))
  missing = [t for t in SPECIAL_TOKENS if t not in vocab]
  if missing:
    raise DataError(f"{path}: vocabulary lacks special token(s) {', '.join(missing)}")
  hf = HFTokenizer(models.WordPiece(vocab, unk_token=UNK, continuing_subword_prefix=_PREFIX))
  # strip_accents=None follows `lowercase`, as in BERT's own tokenizer.
  hf.normalizer = normalizers.BertNormalizer(
      clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
  hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  hf.decoder = decoders.WordPiece(prefix=_PREFIX)
  hf.add_special_tokens(list(SPECIAL_TOKENS))
  return hf


# ---- training --------------------------------------------------------------------------------
def train_tokenizer(texts: Iterable[str], *, kind: str = "wordpiece", vocab_size: int = 8192,
                    model_type: str = "unigram", lowercase: bool = False, seed: int = 0,
                    workdir_tmp: str | None = None) -> Tokenizer:
  """Trains a tokenizer on a stream of documents; same input gives the same vocab.

  Args:
    texts: documents (any iterable; consumed once, streamed).
    kind: "wordpiece" or "sentencepiece".
    vocab_size: target size including the 5 special tokens.
    model_type: SentencePiece model, "unigram" or "bpe" (ignored for wordpiece).
    lowercase: lowercase in the tokenizer's normalizer.
    seed: SentencePiece's random seed (WordPiece training uses no randomness).
    workdir_tmp: where WordPiece spools the corpus (default: the system temp dir).
  """
  if kind not in KINDS:
    raise ConfigError(f"tokenizer.kind must be one of {KINDS}, got {kind!r}")
  if kind == "sentencepiece" and model_type not in SPM_MODEL_TYPES:
    raise ConfigError(f"tokenizer.model_type must be one of {SPM_MODEL_TYPES}, got {model_type!r}")
  # SentencePiece with byte fallback always holds the 256 byte pieces.
  min_size = len(SPECIAL_TOKENS) + (256 if kind == "sentencepiece" else 0) + 1
  if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < min_size:
    raise ConfigError(f"tokenizer.vocab_size must be an integer >= {min_size} for {kind}, "
                      f"got {vocab_size!r}")
  if kind == "wordpiece":
    return _train_wordpiece(texts, vocab_size, lowercase, workdir_tmp)
  return _train_sentencepiece(texts, vocab_size, model_type, lowercase, seed)


def _train_wordpiece(texts: Iterable[str], vocab_size: int, lowercase: bool,
                     workdir_tmp: str | None) -> Tokenizer:
  hf = HFTokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix=_PREFIX))
  hf.normalizer = (normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
                   if lowercase else normalizers.NFC())
  hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  hf.decoder = decoders.WordPiece(prefix=_PREFIX)
  if workdir_tmp:
    os.makedirs(workdir_tmp, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=workdir_tmp, prefix="jaxlm-tokenizer-") as tmp:
    # Two passes (spool to disk, then train) because of a tokenizers bug
    # (huggingface/tokenizers#1794): "##c" tokens get ids in hash-map order,
    # which breaks merge ties differently on every run. Registering every
    # "##c" up front, in sorted order, makes training deterministic.
    spool = os.path.join(tmp, "corpus.txt")
    chars: set[str] = set()
    with open(spool, "w", encoding="utf-8") as f:
      for text in texts:
        if text.strip():
          f.write(text if text.endswith("\n") else text + "\n")
          chars.update(hf.normalizer.normalize_str(text))
    if not chars:
      raise DataError("tokenizer: the training corpus is empty")
    continuations = [_PREFIX + c for c in sorted(chars) if _can_continue_word(c)]
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS) + continuations,
        continuing_subword_prefix=_PREFIX, show_progress=False)
    hf.train([spool], trainer=trainer)
  # The "##c" helpers were only for ordering: make them ordinary vocab entries.
  spec = json.loads(hf.to_str())
  spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in SPECIAL_TOKENS]
  tokenizer = Tokenizer(HFTokenizer.from_str(json.dumps(spec)))
  if tokenizer.vocab_size > vocab_size:
    raise ConfigError(f"tokenizer.vocab_size={vocab_size} is below the {tokenizer.vocab_size} "
                      "tokens the corpus alphabet needs; increase it")
  return tokenizer


def _can_continue_word(c: str) -> bool:
  """Whether BertPreTokenizer can put `c` after the first character of a word."""
  if c.isspace() and c not in "\x1c\x1d\x1e\x1f":  # Python-only "spaces" stay in words
    return False
  o = ord(c)
  is_ascii_punct = 33 <= o <= 47 or 58 <= o <= 64 or 91 <= o <= 96 or 123 <= o <= 126
  return not (is_ascii_punct or unicodedata.category(c).startswith("P"))


def _train_sentencepiece(texts: Iterable[str], vocab_size: int, model_type: str,
                         lowercase: bool, seed: int) -> Tokenizer:
  counter = [0]
  model = io.BytesIO()
  spm.set_random_generator_seed(seed)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_spm_sentences(texts, counter), model_writer=model,
        vocab_size=vocab_size, model_type=model_type,
        pad_id=0, pad_piece=PAD, unk_id=1, unk_piece=UNK, bos_id=-1, eos_id=-1,
        control_symbols=[CLS, SEP, MASK], byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=_SPM_THREADS,
        max_sentence_length=4 * _SPM_MAX_LINE_CHARS + 192, minloglevel=2)
  except RuntimeError as e:
    if not counter[0]:
      raise DataError("tokenizer: the training corpus is empty") from None
    message = str(e).split("] ", 1)[-1].strip()
    if "ocabulary size" in message:
      raise ConfigError(f"tokenizer.vocab_size={vocab_size}: {message}") from None
    raise DataError(f"tokenizer: SentencePiece training failed: {message}") from None
  processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
  return Tokenizer(processor)


def _spm_sentences(texts: Iterable[str], counter: list[int]) -> Iterator[str]:
  """Non-empty lines of the documents, long lines split at spaces, capped in number."""
  for text in texts:
    for line in text.splitlines():
      line = line.strip()
      while line:
        if counter[0] >= _SPM_MAX_SENTENCES:
          return
        head, line = _split_long_line(line)
        counter[0] += 1
        yield head


def _split_long_line(line: str) -> tuple[str, str]:
  if len(line) <= _SPM_MAX_LINE_CHARS:
    return line, ""
  cut = line.rfind(" ", 0, _SPM_MAX_LINE_CHARS)
  cut = cut if cut > 0 else _SPM_MAX_LINE_CHARS
  return line[:cut], line[cut:].lstrip()
