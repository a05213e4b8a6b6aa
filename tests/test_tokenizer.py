"""Tests for jaxlm.data.tokenizer: training, special ids, OOV, files, determinism."""

import json
import os

import numpy as np
import pytest

from jaxlm.data.clean import CleanOptions, clean_text
from jaxlm.data.sources import iter_documents
from jaxlm.data.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer
from jaxlm.errors import ConfigError, DataError

KINDS = ("wordpiece", "sentencepiece")
VOCAB = 1500


@pytest.fixture(scope="module")
def corpus():
  docs = [d for d in iter_documents("embedded") if d.label == "tragedies"]
  return [clean_text(d.text, CleanOptions()) for d in docs[:40]]


@pytest.fixture(scope="module")
def toks(corpus):
  return {kind: train_tokenizer(iter(corpus), kind=kind, vocab_size=VOCAB) for kind in KINDS}


@pytest.fixture(scope="module")
def lines(corpus):
  return [line for doc in corpus[:5] for line in doc.splitlines() if line.strip()]


def test_special_tokens_order():
  assert SPECIAL_TOKENS == ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@pytest.mark.parametrize("kind", KINDS)
def test_special_ids(toks, kind):
  tok = toks[kind]
  assert tok.kind == kind and tok.vocab_size == VOCAB
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  assert tok.special_ids == frozenset(range(5))
  assert [tok.id_to_token(i) for i in range(5)] == list(SPECIAL_TOKENS)
  assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]


def test_sentencepiece_bpe_special_ids(corpus):
  tok = train_tokenizer(iter(corpus[:10]), kind="sentencepiece", model_type="bpe",
                        vocab_size=600)
  assert [tok.id_to_token(i) for i in range(5)] == list(SPECIAL_TOKENS)


def test_sentencepiece_round_trip_is_exact(toks, lines):
  tok = toks["sentencepiece"]
  for line in lines:
    assert tok.decode(tok.encode(line)) == line


def test_wordpiece_round_trip_modulo_spacing(toks, lines):
  tok = toks["wordpiece"]
  for line in lines:
    assert tok.decode(tok.encode(line)).replace(" ", "") == line.replace(" ", "")


def test_wordpiece_oov_is_unk(toks):
  tok = toks["wordpiece"]
  ids = tok.encode("king \U0001F600 \u65e5")
  assert ids[1:] == [tok.unk_id, tok.unk_id] and ids[0] != tok.unk_id


def test_sentencepiece_oov_uses_bytes(toks):
  tok = toks["sentencepiece"]
  text = "king \U0001F600 \u65e5 caf\u00e9"
  ids = tok.encode(text)
  assert tok.unk_id not in ids
  assert "<0xF0>" in [tok.id_to_token(i) for i in ids]  # first byte of the emoji
  assert tok.decode(ids) == text


@pytest.mark.parametrize("kind", KINDS)
def test_literal_special_text_is_not_special(toks, kind):
  tok = toks[kind]
  assert not set(tok.encode("the [MASK] and [CLS]")) & tok.special_ids
  ids = tok.encode("the [MASK] is here", parse_special=True)
  assert ids.count(tok.mask_id) == 1 and len(set(ids) & tok.special_ids) == 1
  assert "[MASK]" in tok.decode(ids, skip_special=False)
  assert "[MASK]" not in tok.decode(ids)


@pytest.mark.parametrize("kind", KINDS)
def test_word_starts(toks, kind):
  tok = toks[kind]
  ids = tok.encode("unfoldingly wondrous")
  starts = [tok.is_word_start(i) for i in ids]
  assert len(ids) > 2 and starts[0] and sum(starts) == 2
  assert not any(tok.is_word_start(i) for i in tok.special_ids)
  mask = tok.word_start_mask
  assert mask.shape == (tok.vocab_size,) and mask.dtype == bool
  for i in range(tok.vocab_size):
    token = tok.id_to_token(i)
    if kind == "wordpiece" and token.startswith("##"):
      assert not mask[i]
    if kind == "sentencepiece" and token.startswith("<0x"):
      assert not mask[i]


@pytest.mark.parametrize("kind", KINDS)
def test_encode_batch_matches_encode(toks, lines, kind):
  tok = toks[kind]
  assert tok.encode_batch(lines) == [tok.encode(line) for line in lines]
  assert tok.encode_batch([]) == [] and tok.encode("") == []


@pytest.mark.parametrize("kind", KINDS)
def test_vocab_lookups(toks, kind):
  tok = toks[kind]
  assert tok.token_to_id("no-such-token-xyz") is None
  assert tok.decode(np.array(tok.encode("the king"))).replace(" ", "") == "theking"
  with pytest.raises(IndexError):
    tok.id_to_token(tok.vocab_size)


@pytest.mark.parametrize("kind, filename", [("wordpiece", "tokenizer.json"),
                                            ("sentencepiece", "spm.model")])
def test_save_load_round_trip(toks, lines, tmp_path, kind, filename):
  tok = toks[kind]
  path = tok.save(str(tmp_path / "tok"))
  assert path == str(tmp_path / "tok" / filename)
  for loaded in (Tokenizer.load(path), Tokenizer.load(str(tmp_path / "tok"))):
    assert loaded.kind == kind and loaded.vocab_size == tok.vocab_size
    assert loaded.encode_batch(lines) == tok.encode_batch(lines)
    assert loaded.special_ids == tok.special_ids


@pytest.mark.parametrize("kind", KINDS)
def test_training_is_deterministic(corpus, tmp_path, kind):
  paths = [train_tokenizer(iter(corpus), kind=kind, vocab_size=VOCAB).save(str(tmp_path / str(i)))
           for i in range(2)]
  contents = [open(p, "rb").read() for p in paths]
  assert contents[0] == contents[1]


def test_lowercase_option(corpus):
  for kind in KINDS:
    tok = train_tokenizer(iter(corpus[:10]), kind=kind, vocab_size=600, lowercase=True)
    assert tok.encode("KING Lear") == tok.encode("king lear")


# ---- training errors ---------------------------------------------------------------------------
def test_unknown_kind():
  with pytest.raises(ConfigError, match="^tokenizer.kind"):
    train_tokenizer(iter(["a b c"]), kind="bpe")
  with pytest.raises(ConfigError, match="^tokenizer.model_type"):
    train_tokenizer(iter(["a b c"]), kind="sentencepiece", model_type="char")


@pytest.mark.parametrize("kind, size", [("wordpiece", 5), ("sentencepiece", 200),
                                        ("wordpiece", 30), ("sentencepiece", 265)])
def test_vocab_too_small(corpus, kind, size):
  with pytest.raises(ConfigError, match="^tokenizer.vocab_size"):
    train_tokenizer(iter(corpus[:3]), kind=kind, vocab_size=size)


def test_sentencepiece_vocab_too_large():
  with pytest.raises(ConfigError, match="^tokenizer.vocab_size=5000: Vocabulary size too high"):
    train_tokenizer(iter(["the cat sat on the mat"] * 20), kind="sentencepiece", vocab_size=5000)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_corpus(kind):
  with pytest.raises(DataError, match="corpus is empty"):
    train_tokenizer(iter(["", "  \n"]), kind=kind, vocab_size=1000)


# ---- loading -----------------------------------------------------------------------------------
def test_load_bert_vocab_txt(tmp_path):
  vocab = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s",
           ",", "!"]
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
  tok = Tokenizer.load(str(tmp_path), lowercase=True)
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 2, 3, 4, 5)
  assert [tok.id_to_token(i) for i in tok.encode("Hello, worlds! xyz")] == [
      "hello", ",", "world", "##s", "!", "[UNK]"]
  assert tok.decode(tok.encode("hello worlds")) == "hello worlds"
  cased = Tokenizer.load(str(path))
  assert cased.encode("Hello") == [cased.unk_id]


def test_load_vocab_without_specials(tmp_path):
  path = tmp_path / "vocab.txt"
  path.write_text("[PAD]\n[UNK]\nhello\n", encoding="utf-8")
  with pytest.raises(DataError, match="lacks special token.*\\[CLS\\], \\[SEP\\], \\[MASK\\]"):
    Tokenizer.load(str(path))


def test_load_errors(tmp_path):
  missing = str(tmp_path / "nope" / "tokenizer.json")
  with pytest.raises(DataError, match="no such file or directory") as e:
    Tokenizer.load(missing)
  assert missing in str(e.value)
  with pytest.raises(DataError, match="no tokenizer.json, spm.model, vocab.txt"):
    Tokenizer.load(str(tmp_path))
  bad_json = tmp_path / "tokenizer.json"
  bad_json.write_text("{not json", encoding="utf-8")
  with pytest.raises(DataError, match="not a valid tokenizer.json"):
    Tokenizer.load(str(bad_json))
  bad_json.write_text(json.dumps({"model": {"type": "BPE"}}), encoding="utf-8")
  with pytest.raises(DataError, match="invalid BPE tokenizer.json"):
    Tokenizer.load(str(bad_json))
  bad_model = tmp_path / "x.model"
  bad_model.write_bytes(b"\x00garbage\xff")
  with pytest.raises(DataError, match=f"^{bad_model}: not a valid SentencePiece model"):
    Tokenizer.load(str(bad_model))
  other = tmp_path / "tok.bin"
  other.write_bytes(b"")
  with pytest.raises(DataError, match="unknown tokenizer file type"):
    Tokenizer.load(str(other))
  assert not os.path.exists(tmp_path / "nope")
