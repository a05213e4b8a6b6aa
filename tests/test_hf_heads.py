"""Fine-tuning heads (sequence / token classification, extractive QA) against transformers on
the tiny fixtures in tests/fixtures/hf/heads (make_heads.py), HF-format round trips, labels in
config.json, and the decoders' last-real-token pooling."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import jaxlm
from conftest import fixture
from jaxlm import ConfigError, ModelConfig, build_model
from jaxlm.hf.common import labels_from_hf, labels_to_hf
from jaxlm.models.heads import last_token_positions, pool_at
from jaxlm.params import flat_params

# fixture directory -> HF class
CLASSES = {
    "bert_seq": "BertForSequenceClassification",
    "roberta_seq": "RobertaForSequenceClassification",
    "distilbert_seq": "DistilBertForSequenceClassification",
    "bert_token": "BertForTokenClassification",
    "bert_qa": "BertForQuestionAnswering",
    "llama_seq": "LlamaForSequenceClassification",
    "mistral_seq": "MistralForSequenceClassification",
    "gpt2_seq": "GPT2ForSequenceClassification",
}
DECODERS = ("llama_seq", "mistral_seq", "gpt2_seq")
SENTIMENT = {0: "negative", 1: "neutral", 2: "positive"}
TOL = 1e-4  # max |Δ| against transformers, fp32 (measured: <= 1.6e-6)
SMALL = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
             intermediate_size=32, max_position_embeddings=32)
LLAMA = dict(model_type="llama", causal=True, norm_type="rmsnorm", norm_position="pre",
             mlp_type="gated", position_embedding_type="rope", type_vocab_size=0,
             attention_bias=False, mlp_bias=False, tie_word_embeddings=False)


def path(name):
  return fixture(os.path.join("heads", name))


def npz(name, what):
  return dict(np.load(os.path.join(path(name), f"{what}.npz")))


def run(model, name):
  x = npz(name, "inputs")
  ids = x.pop("input_ids")
  return model(ids, **x)


def outputs(out) -> dict:
  return {k: np.asarray(getattr(out, k)) for k in ("logits", "start_logits", "end_logits")
          if getattr(out, k) is not None}


def config_json(directory):
  with open(os.path.join(directory, "config.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def loaded():
  return {name: jaxlm.from_pretrained(path(name)) for name in CLASSES}


# ---- parity -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_outputs_match_transformers(loaded, name):
  model = loaded[name]
  assert model.config.architectures == [CLASSES[name]]
  got, want = outputs(run(model, name)), npz(name, "expected")
  assert got.keys() == want.keys()
  for key, expected in want.items():  # every position, padding included
    assert got[key].shape == expected.shape, key
    diff = np.abs(got[key] - expected).max()
    assert diff <= TOL, (key, diff)


def test_labels_come_from_config_json(loaded):
  for name in ("bert_seq", "roberta_seq", "distilbert_seq", *DECODERS):
    cfg = loaded[name].config
    assert (cfg.num_labels, cfg.id2label) == (3, SENTIMENT), name
    assert cfg.label2id == {v: k for k, v in SENTIMENT.items()}, name
  assert loaded["bert_token"].config.id2label[1] == "B-PER"
  assert loaded["bert_token"].config.num_labels == 5
  qa = loaded["bert_qa"].config  # no labels in its config.json: transformers' default 2
  assert (qa.num_labels, qa.id2label, qa.label2id) == (2, None, None)
  assert loaded["bert_seq"].config.classifier_dropout == 0.3
  assert loaded["distilbert_seq"].config.classifier_dropout == 0.25  # seq_classif_dropout


def test_head_layout_follows_the_class(loaded):
  names = {n: set(flat_params(loaded[n])) for n in CLASSES}
  assert "bert.pooler.kernel" in names["bert_seq"]  # BERT classifies the pooler output
  assert not any("pooler" in k for k in names["roberta_seq"] | names["distilbert_seq"]
                 | names["bert_token"] | names["bert_qa"])
  assert {"classifier.dense.kernel", "classifier.out.kernel"} <= names["roberta_seq"]
  assert {"classifier.dense.kernel", "classifier.out.kernel"} <= names["distilbert_seq"]
  assert "classifier.dense.kernel" not in names["bert_seq"]
  assert "qa.out.kernel" in names["bert_qa"]
  for name in DECODERS:
    assert "score.kernel" in names[name] and "score.bias" not in names[name]
    assert not any(k.startswith("lm_head") for k in names[name])


# ---- round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_save_pretrained_round_trip(loaded, tmp_path, name):
  model = loaded[name]
  assert model.save_pretrained(str(tmp_path)) == "hf"
  ours = load_file(str(tmp_path / "model.safetensors"))
  theirs = load_file(os.path.join(path(name), "model.safetensors"))
  assert ours.keys() == theirs.keys()
  for k, v in theirs.items():
    assert ours[k].shape == v.shape and np.array_equal(ours[k], v), k
  saved, original = config_json(str(tmp_path)), config_json(path(name))
  assert saved["architectures"] == [CLASSES[name]]
  for key in ("id2label", "label2id", "classifier_dropout", "seq_classif_dropout",
              "pad_token_id"):
    assert saved.get(key) == original.get(key), key
  # Whatever else both files have means the same.
  common = set(saved) & set(original) - {"transformers_version"}
  assert {k: saved[k] for k in common} == {k: original[k] for k in common}
  again = jaxlm.from_pretrained(str(tmp_path))
  assert again.config == model.config
  for key, value in outputs(run(model, name)).items():
    np.testing.assert_array_equal(outputs(run(again, name))[key], value, err_msg=key)


@pytest.mark.parametrize("arch, extra", [
    ("BertForSequenceClassification", {}),
    ("RobertaForSequenceClassification", dict(model_type="roberta", position_ids_from_mask=True,
                                              pad_token_id=1, type_vocab_size=1)),
    ("DistilBertForSequenceClassification", dict(model_type="distilbert", type_vocab_size=0)),
    ("BertForTokenClassification", {}),
    ("GPT2ForSequenceClassification", dict(model_type="gpt2", causal=True, norm_position="pre",
                                           type_vocab_size=0)),
])
def test_fresh_head_round_trips_with_labels(tmp_path, arch, extra):
  """What fine-tuning saves (a fresh model with named labels) reloads equal."""
  cfg = ModelConfig(architectures=[arch], num_labels=4, id2label=dict(enumerate("abcd")),
                    label2id={c: i for i, c in enumerate("abcd")}, classifier_dropout=0.05,
                    **SMALL, **extra)
  model = build_model(cfg, seed=3)
  assert model.save_pretrained(str(tmp_path)) == "hf"
  raw = config_json(str(tmp_path))
  assert raw["id2label"] == {"0": "a", "1": "b", "2": "c", "3": "d"}
  again = jaxlm.from_pretrained(str(tmp_path))
  assert (again.config.num_labels, again.config.id2label) == (4, cfg.id2label)
  ids = np.arange(3, 23).reshape(2, 10)
  np.testing.assert_array_equal(model(ids).logits, again(ids).logits)


# ---- built from a ModelConfig -----------------------------------------------------------------


@pytest.mark.parametrize("arch, extra, shapes", [
    ("BertForSequenceClassification", dict(num_labels=3), {"logits": (2, 3)}),
    ("RobertaForSequenceClassification", dict(num_labels=3, model_type="roberta"),
     {"logits": (2, 3)}),
    ("DistilBertForSequenceClassification",
     dict(num_labels=1, model_type="distilbert", type_vocab_size=0), {"logits": (2, 1)}),
    ("BertForTokenClassification", dict(num_labels=5), {"logits": (2, 10, 5)}),
    ("BertForQuestionAnswering", {}, {"start_logits": (2, 10), "end_logits": (2, 10)}),
    ("LlamaForSequenceClassification", dict(num_labels=3, **LLAMA), {"logits": (2, 3)}),
    ("MistralForSequenceClassification",
     dict(num_labels=3, **{**LLAMA, "model_type": "mistral"}, sliding_window=4),
     {"logits": (2, 3)}),
    ("GPT2ForSequenceClassification",
     dict(num_labels=3, model_type="gpt2", causal=True, norm_position="pre", type_vocab_size=0),
     {"logits": (2, 3)}),
])
def test_build_model_output_shapes(arch, extra, shapes):
  model = build_model(ModelConfig(architectures=[arch], **{**SMALL, **extra}))
  out = model(np.arange(3, 23).reshape(2, 10))
  assert {k: v.shape for k, v in outputs(out).items()} == shapes
  assert all(v.dtype == np.float32 for v in outputs(out).values())


def test_dropout_only_with_rngs():
  model = build_model(ModelConfig(architectures=["RobertaForSequenceClassification"],
                                  model_type="roberta", num_labels=3, classifier_dropout=0.5,
                                  **SMALL))
  ids = np.arange(3, 23).reshape(2, 10)
  a, b = model(ids).logits, model(ids).logits
  np.testing.assert_array_equal(a, b)
  c = model(ids, rngs=nnx.Rngs(dropout=0)).logits
  assert not np.allclose(a, c)


def test_qa_needs_two_labels():
  with pytest.raises(ConfigError, match="model.num_labels=3"):
    build_model(ModelConfig(architectures=["BertForQuestionAnswering"], num_labels=3, **SMALL))


# ---- decoder pooling ----------------------------------------------------------------------------
def rightmost_non_pad(ids, pad):
  """transformers' rule written as a loop: the last index whose token is not the pad id."""
  out = []
  for row in ids:
    real = [t for t, tok in enumerate(row) if tok != pad]
    out.append(real[-1] if real else 0)
  return np.array(out)


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_pools_at_each_rows_last_real_token(loaded, name):
  model = loaded[name]
  x = npz(name, "inputs")
  ids, mask = x["input_ids"], x["attention_mask"]
  pos = rightmost_non_pad(ids, model.config.pad_token_id)
  # Row 0 holds the pad id at position 4 (still real text), row 1 is right-padded after 7
  # tokens, row 2 left-padded.
  assert pos.tolist() == [11, 6, 11]
  _, h_BTD = model.model(ids, mask)
  scores_BTC = np.asarray(model.score(h_BTD))
  manual = scores_BTC[np.arange(len(ids)), pos]
  got = np.asarray(model(ids, attention_mask=mask).logits)
  np.testing.assert_array_equal(got, manual)
  # ... and not at the last position, nor before the first pad id.
  assert not np.allclose(got[1], scores_BTC[1, -1])
  assert not np.allclose(got[0], scores_BTC[0, 3])


def test_last_token_positions_edge_cases():
  ids = np.array([[5, 6, 0, 0], [0, 0, 7, 8], [0, 0, 0, 0], [9, 0, 9, 0]])
  assert np.asarray(last_token_positions(ids, 0)).tolist() == [1, 3, 0, 2]
  assert np.asarray(last_token_positions(ids, None)).tolist() == [3, 3, 3, 3]
  x = np.arange(24, dtype=np.float32).reshape(2, 4, 3)
  np.testing.assert_array_equal(pool_at(x, np.array([3, 1])), x[[0, 1], [3, 1]])


def test_decoder_without_pad_id_takes_single_rows_only():
  cfg = ModelConfig(architectures=["LlamaForSequenceClassification"], num_labels=3,
                    pad_token_id=None, **SMALL, **LLAMA)
  model = build_model(cfg)
  ids = np.arange(3, 23).reshape(2, 10)
  with pytest.raises(ConfigError, match="model.pad_token_id"):
    model(ids)
  _, h = model.model(ids[:1])
  np.testing.assert_array_equal(model(ids[:1]).logits, np.asarray(model.score(h))[:, -1])


# ---- labels in ModelConfig --------------------------------------------------------------------
def test_label_keys_from_json_become_ints_and_round_trip(tmp_path):
  cfg = ModelConfig.from_dict({"num_labels": 3, "id2label": {"0": "a", "1": "b", "2": "c"},
                               "label2id": {"a": "0", "b": 1, "c": 2}})
  assert cfg.id2label == {0: "a", 1: "b", 2: "c"} and cfg.label2id == {"a": 0, "b": 1, "c": 2}
  hash(cfg)
  assert hash(cfg) == hash(cfg.replace())
  cfg.save_pretrained(tmp_path)  # a jaxlm export: JSON string keys, read back as ints
  assert json.loads((tmp_path / "config.json").read_text())["id2label"]["1"] == "b"
  assert ModelConfig.from_pretrained(tmp_path) == cfg


@pytest.mark.parametrize("kwargs, needle", [
    (dict(num_labels=0), "model.num_labels must be a positive integer"),
    (dict(num_labels=3, id2label={0: "a", 1: "b"}), "model.id2label must name the ids 0..2"),
    (dict(num_labels=2, id2label={"x": "a", "y": "b"}), "model.id2label: label ids must be"),
    (dict(num_labels=2, label2id={"a": 0, "b": 2}), "model.label2id maps to ids outside"),
    (dict(classifier_dropout=1.0), "model.classifier_dropout"),
])
def test_label_validation_names_the_key(kwargs, needle):
  with pytest.raises(ConfigError, match=needle):
    ModelConfig(**kwargs)


def test_hf_label_spellings():
  assert labels_from_hf({}) == dict(num_labels=2, id2label=None, label2id=None)
  assert labels_from_hf({"num_labels": 4})["num_labels"] == 4
  # id2label wins over num_labels (transformers warns and does the same)
  assert labels_from_hf({"num_labels": 4, "id2label": {"0": "x", "1": "y", "2": "z"}})[
      "num_labels"] == 3
  # transformers' default names mean "no names given", so configs compare equal
  default = {"id2label": {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"},
             "label2id": {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}}
  assert labels_from_hf(default) == dict(num_labels=3, id2label=None, label2id=None)
  assert labels_to_hf(ModelConfig(num_labels=3)) == default
  assert labels_to_hf(ModelConfig()) == {}  # nothing for the default two labels
  # a bare HF config.json read as a ModelConfig: num_labels follows id2label
  assert ModelConfig.from_dict({"id2label": {"0": "a", "1": "b", "2": "c"}},
                               hf=True).num_labels == 3
