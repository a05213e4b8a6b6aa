"""`jaxlm.load_tokenizer` on ready-made tokenizers of every HF model type, built here with
the `tokenizers` library: ids must equal that library's own, special ids come from the
files (None where a role is absent)."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import (BertWordPieceTokenizer, decoders, models, pre_tokenizers, processors,
                        trainers)

import jaxlm
from jaxlm import DataError

CORPUS = [
    "The king is here, and the queen rides to the castle at dawn.",
    "Unfolding stories of kings and queens: a castle, a crown, a kingdom!",
    "Numbers like 1234 and caf\u00e9 na\u00efve r\u00e9sum\u00e9 also appear here.",
    "She said: \"hello world\" -- twice, then left the room quietly.",
] * 20
TEXTS = ["The king rides to the castle.", "hello   world!! caf\u00e9 1234",
         "Unseen wordz like xylophonic", " leading space and trailing ", ""]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
  """A GPT-2 style byte-level BPE with the single <|endoftext|> special token."""
  tok = HFTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(CORPUS, trainer=trainer)
  d = tmp_path_factory.mktemp("gpt2")
  tok.save(str(d / "tokenizer.json"))
  return d, tok


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
  """A BERT-style uncased WordPiece, saved as vocab.txt (plus tokenizer.json elsewhere)."""
  tok = BertWordPieceTokenizer(lowercase=True)
  tok.train_from_iterator(CORPUS, vocab_size=300, show_progress=False,
                          special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
  d = tmp_path_factory.mktemp("bert")
  tok.save_model(str(d))
  return d, tok


def test_gpt2_bpe_ids_match_tokenizers(gpt2_dir):
  d, ref = gpt2_dir
  tok = jaxlm.load_tokenizer(str(d))
  assert tok.kind == "bpe" and tok.vocab_size == ref.get_vocab_size()
  for text in TEXTS:
    assert tok.encode(text) == ref.encode(text).ids
    assert tok.decode(tok.encode(text)) == text
  assert tok.encode_batch(TEXTS) == [e.ids for e in ref.encode_batch(TEXTS)]
  eot = ref.token_to_id("<|endoftext|>")
  assert tok.eos_id == tok.bos_id == eot
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (None,) * 5
  assert tok.special_ids == {eot}
  assert tok.encode("hi<|endoftext|>", parse_special=True)[-1] == eot
  assert eot not in tok.encode("hi<|endoftext|>")  # literal text stays text by default


def test_gpt2_word_starts_and_require(gpt2_dir):
  tok = jaxlm.load_tokenizer(str(gpt2_dir[0]))
  ids = tok.encode("the castle")
  assert [tok.is_word_start(i) for i in ids][1:].count(True) == 1  # "Ġcastle" starts a word
  assert tok.is_word_start(tok.token_to_id("\u0120king"))
  with pytest.raises(DataError, match="no pad, mask token"):
    tok.require("pad", "eos", "mask")
  tok.require("eos")


def test_sidecar_config_names_special_tokens(gpt2_dir, tmp_path):
  d, ref = gpt2_dir
  (tmp_path / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "pad_token": {"content": "<|endoftext|>", "special": True}, "bos_token": None}))
  tok = jaxlm.load_tokenizer(str(tmp_path / "tokenizer.json"))
  assert tok.pad_id == tok.eos_id == ref.token_to_id("<|endoftext|>") and tok.bos_id is None


def test_unigram_with_template_ids_match_tokenizers(tmp_path):
  tok = HFTokenizer(models.Unigram())
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                    unk_token="<unk>", show_progress=False)
  tok.train_from_iterator(CORPUS, trainer=trainer)
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
      ("<s>", tok.token_to_id("<s>"))])
  tok.save(str(tmp_path / "tokenizer.json"))
  loaded = jaxlm.load_tokenizer(str(tmp_path))
  assert loaded.kind == "unigram"
  for text in TEXTS:
    assert loaded.encode(text) == tok.encode(text, add_special_tokens=False).ids
  assert (loaded.unk_id, loaded.bos_id, loaded.eos_id) == (0, 1, 2)
  assert loaded.pad_id is None and loaded.mask_id is None
  assert loaded.is_word_start(loaded.encode("castle")[0])


def test_bert_vocab_txt_ids_match_tokenizers(bert_dir, tmp_path):
  d, ref = bert_dir
  # An uncased BERT directory says so in tokenizer_config.json; no argument needed.
  (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
  tok = jaxlm.load_tokenizer(str(d))
  assert tok.source.endswith("vocab.txt") and tok.kind == "wordpiece"
  for text in TEXTS:
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  assert tok.bos_id is None and tok.eos_id is None
  # The same tokenizer as one tokenizer.json (with BertProcessing) loads identically.
  ref.save(str(tmp_path / "tokenizer.json"))
  as_json = jaxlm.load_tokenizer(str(tmp_path))
  assert as_json.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
  assert (as_json.cls_id, as_json.sep_id, as_json.mask_id) == (2, 3, 4)


def test_bert_post_processor_names_cls_and_sep(bert_dir, tmp_path):
  """cls/sep come from the file even when they are not spelled [CLS]/[SEP]."""
  ref = HFTokenizer.from_str(bert_dir[1]._tokenizer.to_str())
  ref.add_special_tokens(["<go>", "<stop>"])
  ref.post_processor = processors.BertProcessing(("<stop>", ref.token_to_id("<stop>")),
                                                 ("<go>", ref.token_to_id("<go>")))
  ref.save(str(tmp_path / "tokenizer.json"))
  tok = jaxlm.load_tokenizer(str(tmp_path))
  assert (tok.cls_id, tok.sep_id) == (ref.token_to_id("<go>"), ref.token_to_id("<stop>"))


def test_invalid_tokenizer_json_named(tmp_path):
  path = tmp_path / "tokenizer.json"
  path.write_text(json.dumps({"model": {"type": "BPE"}}), encoding="utf-8")
  with pytest.raises(DataError, match="invalid BPE tokenizer.json"):
    jaxlm.load_tokenizer(str(path))
  path.write_text(json.dumps({"version": "1.0"}), encoding="utf-8")
  with pytest.raises(DataError, match="no model type"):
    jaxlm.load_tokenizer(str(path))


def test_gpt2_vocab_and_merges_without_tokenizer_json(gpt2_dir, tmp_path):
  """GPT-2's original files: vocab.json + merges.txt load as the same byte-level BPE (what
  transformers' GPT2TokenizerFast builds from them), <|endoftext|> special."""
  d, ref = gpt2_dir
  ref.model.save(str(tmp_path))  # vocab.json, merges.txt (with a "#version" header)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "vocab.json"]
  tok = jaxlm.load_tokenizer(str(tmp_path))
  assert tok.kind == "bpe" and tok.vocab_size == ref.get_vocab_size()
  for text in TEXTS:
    assert tok.encode(text) == ref.encode(text).ids
    assert tok.decode(tok.encode(text)) == text
  eot = ref.token_to_id("<|endoftext|>")
  assert tok.eos_id == eot and tok.special_ids == {eot}
  assert tok.encode("hi<|endoftext|>", parse_special=True)[-1] == eot
  (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
  with pytest.raises(DataError, match=r"merges.txt: line 2 is not a merge of two tokens"):
    jaxlm.load_tokenizer(str(tmp_path))
  (tmp_path / "merges.txt").unlink()
  with pytest.raises(DataError, match=r"merges.txt"):
    jaxlm.load_tokenizer(str(tmp_path))
