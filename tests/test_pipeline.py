"""Corpus preparation and the grain pipeline on a small generated corpus."""

import json

import ml_collections
import numpy as np
import pytest

from jaxlm import experiment, tasks
from jaxlm.data import pipeline
from jaxlm.data.corpus import prepare_corpus
from jaxlm.errors import ConfigError

WORDS = "the king queen sword crown night storm ghost blood honour love death".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  src = tmp_path_factory.mktemp("src")
  rng = np.random.default_rng(0)
  for d in range(60):
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) + f" doc{d}."
             for _ in range(30)]
    (src / f"doc{d:02d}.txt").write_text("\n".join(lines))
  cfg = experiment.base_config()
  cfg.data.source = str(src)
  cfg.data.max_seq_len = 32
  cfg.tokenizer.vocab_size = 200
  wd = tmp_path_factory.mktemp("wd")
  return prepare_corpus(cfg.data, cfg.tokenizer, str(wd / "data"), log=lambda _: None), cfg


def test_corpus_layout(corpus):
  c, _ = corpus
  assert sum(c.manifest[f"docs_{s}"] for s in ("train", "validation", "test")) == 60
  s = c.splits["train"]
  assert s.num_docs == c.manifest["docs_train"] and s.num_tokens == c.manifest["tokens_train"]
  # Every document's lines decode back to its text's words.
  assert "doc" in c.tokenizer.decode(s.line(0).tolist())
  chunks = s.chunks(29)
  lengths = np.diff(s.line_offsets)
  for d, first, end in chunks:
    assert s.doc_lines[d] <= first < end <= s.doc_lines[d + 1]
    assert lengths[first:end].sum() <= 29 or end - first == 1
  # Unigram baseline is a normalized distribution over the vocabulary.
  np.testing.assert_allclose(np.exp(c.unigram_log_probs()).sum(), 1.0, rtol=1e-9)


def test_reusing_workdir_with_other_settings_is_refused(corpus, tmp_path):
  c, cfg = corpus
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.tokenizer.vocab_size = 300
  with pytest.raises(ConfigError, match="tokenizer.vocab_size"):
    prepare_corpus(cfg.data, cfg.tokenizer, c.directory)


def test_nsp_pairs_are_balanced_and_well_formed(corpus):
  c, cfg = corpus
  it = tasks.get("mlm+nsp").train_iterator(c, cfg.data, batch_size=64, seed=0)
  batch = next(it)
  assert batch["input_ids"].shape == (64, 32)
  assert 0.3 < batch["nsp_label"].mean() < 0.7
  tok = c.tokenizer
  for ids, types, attn in zip(batch["input_ids"], batch["token_type_ids"],
                              batch["attention_mask"]):
    n = attn.sum()
    assert ids[0] == tok.cls_id and ids[n - 1] == tok.sep_id and (ids[n:] == tok.pad_id).all()
    assert (ids[:n] == tok.sep_id).sum() == 2 and types[n - 1] == 1 and types[0] == 0


def test_true_next_segments_come_from_the_same_document(corpus):
  c, cfg = corpus
  sp = pipeline.special_ids(c)
  s = c.splits["train"]
  chunks = s.chunks(29)
  builder = pipeline.BertPairs(s, chunks, sp, max_seq_len=32, mask_prob=0.15, mlm=False)
  rng = np.random.default_rng(0)
  for row in chunks[:50]:
    ex = builder(row, rng)
    ids = ex["input_ids"][ex["attention_mask"] == 1].tolist()
    text = c.tokenizer.decode(ids)
    docs = {w for w in text.replace(".", " ").split() if w.startswith("doc")}
    if ex["nsp_label"] == 1:
      assert len(docs) == 1, text  # both segments carry the same doc tag


def test_iterator_state_resumes_exactly(corpus):
  c, cfg = corpus
  it = tasks.get("mlm+nsp").train_iterator(c, cfg.data, batch_size=8, seed=3)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  json.dumps(state)  # stored in the checkpoint as JSON
  it2 = tasks.get("mlm+nsp").train_iterator(c, cfg.data, batch_size=8, seed=3)
  it2.set_state(state)
  for want in expected:
    got = next(it2)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  other = next(iter(tasks.get("mlm+nsp").train_iterator(c, cfg.data, batch_size=8,
                                            seed=4)))
  assert not np.array_equal(other["input_ids"], expected[0]["input_ids"])


def test_eval_batches_pad_with_zero_weight(corpus):
  c, cfg = corpus
  n = len(tasks.get("mlm+nsp").examples(c, "validation", cfg.data, 0).source)
  batches = list(tasks.get("mlm+nsp").eval_batches(c, "validation", cfg.data,
                                       batch_size=7, seed=0))
  assert sum(b["example_weight"].sum() for b in batches) == n
  again = list(tasks.get("mlm+nsp").eval_batches(c, "validation", cfg.data,
                                     batch_size=7, seed=0))
  np.testing.assert_array_equal(batches[0]["input_ids"], again[0]["input_ids"])


def test_nsp_label_cannot_be_read_off_the_length(corpus):
  """True and random next segments have the same length distribution (an earlier
  version padded only true pairs, and the model learned NSP from the padding)."""
  c, cfg = corpus
  it = tasks.get("nsp").train_iterator(c, cfg.data, batch_size=512, seed=0)
  batch = next(it)
  n_real = batch["attention_mask"].sum(1)
  n_b = (batch["token_type_ids"] * batch["attention_mask"]).sum(1)
  pos, neg = batch["nsp_label"] == 1, batch["nsp_label"] == 0
  for stat in (n_real, n_b, n_real == cfg.data.max_seq_len):
    assert abs(stat[pos].mean() - stat[neg].mean()) < 0.1 * max(stat[pos].mean(), 1e-3) + 0.05
