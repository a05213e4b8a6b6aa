"""BERT / RoBERTa / DistilBERT interop: parity with transformers' outputs on the tiny
fixtures (tests/fixtures/hf), save/load round trips in HF format, and named errors."""

import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxlm
from conftest import fixture
from jaxlm import ConfigError, DataError, JaxlmError, ModelConfig, build_model
from jaxlm.hf import family_of
from jaxlm.params import flat_params

CLASSES = {
    "bert": "BertModel",
    "bert_mlm": "BertForMaskedLM",
    "bert_pretraining": "BertForPreTraining",
    "roberta_mlm": "RobertaForMaskedLM",
    "distilbert": "DistilBertModel",
    "distilbert_mlm": "DistilBertForMaskedLM",
}
OUTPUTS = ("logits", "nsp_logits", "last_hidden_state", "pooler_output")
SMALL = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=32, max_position_embeddings=32)


def run(model, name):
  inputs = dict(np.load(os.path.join(fixture(name), "inputs.npz")))
  return model(inputs["input_ids"], attention_mask=inputs["attention_mask"],
               token_type_ids=inputs.get("token_type_ids")), inputs


def tensors(directory):
  return load_file(os.path.join(directory, "model.safetensors"))


def broken_copy(tmp_path, name, edit):
  """A copy of a fixture whose tensors went through `edit(dict) -> dict`."""
  d = tmp_path / name
  shutil.copytree(fixture(name), d)
  save_file(edit(tensors(str(d))), str(d / "model.safetensors"))
  return str(d)


@pytest.fixture(scope="module")
def loaded():
  return {name: jaxlm.from_pretrained(fixture(name)) for name in CLASSES}


# ---- parity ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_outputs_match_transformers(loaded, name):
  model = loaded[name]
  assert type(model).__name__ in {"BertModel", "DistilBertModel", "BertForMaskedLM",
                                  "BertForPreTraining"}
  assert model.config.architectures == [CLASSES[name]]
  out, inputs = run(model, name)
  want = dict(np.load(os.path.join(fixture(name), "expected.npz")))
  real_BT = inputs["attention_mask"].astype(bool)
  for key in OUTPUTS:
    got = getattr(out, key)
    if key not in want:
      continue
    got, expected = np.asarray(got), want[key]
    assert got.shape == expected.shape, key
    if got.ndim == 3:  # padded positions are not compared
      got, expected = got[real_BT], expected[real_BT]
    tol = 1e-4 * max(1.0, float(np.abs(expected).max()))
    assert np.abs(got - expected).max() <= tol, (key, np.abs(got - expected).max(), tol)


def test_base_models_have_no_head_outputs(loaded):
  out, _ = run(loaded["distilbert"], "distilbert")
  assert out.logits is None and out.pooler_output is None
  out, _ = run(loaded["bert"], "bert")
  assert out.pooler_output.shape == (2, 32)


def test_masked_lm_masked_positions_gather(loaded):
  model = loaded["roberta_mlm"]
  out, inputs = run(model, "roberta_mlm")
  pos = np.array([[0, 5, 11], [1, 2, 6]])
  gathered = model(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                   masked_positions=pos).logits
  np.testing.assert_allclose(gathered, np.take_along_axis(np.asarray(out.logits),
                                                          pos[..., None], 1), atol=1e-5)


# ---- round trips -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_save_reload_identical_and_hf_shaped(loaded, name, tmp_path):
  model = loaded[name]
  model.save_pretrained(str(tmp_path))
  again = jaxlm.from_pretrained(str(tmp_path))
  a, b = flat_params(model), flat_params(again)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  # The same tensor names and shapes transformers wrote, so transformers loads it.
  ours, theirs = tensors(str(tmp_path)), tensors(fixture(name))
  assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
  # Every key we write means what the fixture's config.json says.
  with open(tmp_path / "config.json") as f:
    saved = json.load(f)
  with open(os.path.join(fixture(name), "config.json")) as f:
    original = json.load(f)
  assert saved["architectures"] == [CLASSES[name]]
  assert {k: v for k, v in saved.items() if k in original} == {
      k: original[k] for k in saved if k in original}
  assert set(saved) <= set(original), set(saved) - set(original)


def test_pretraining_model_round_trip(tmp_path):
  """What the training loop saves (a fresh BertForPreTraining) reloads with equal logits."""
  model = build_model(ModelConfig(architectures=["BertForPreTraining"], **SMALL))
  model.save_pretrained(str(tmp_path))
  assert "cls.seq_relationship.weight" in tensors(str(tmp_path))
  again = jaxlm.from_pretrained(str(tmp_path))
  ids = np.arange(20).reshape(2, 10) % SMALL["vocab_size"]
  np.testing.assert_array_equal(model(ids).logits, again(ids).logits)
  np.testing.assert_array_equal(model(ids).nsp_logits, again(ids).nsp_logits)


@pytest.mark.parametrize("arch, decoder", [
    ("BertForMaskedLM", ["cls.predictions.decoder.weight", "cls.predictions.decoder.bias"]),
    ("RobertaForMaskedLM", ["lm_head.decoder.weight", "lm_head.decoder.bias"]),
    ("DistilBertForMaskedLM", ["vocab_projector.weight"]),
])
def test_untied_head_round_trip(tmp_path, arch, decoder):
  extra = {"RobertaForMaskedLM": dict(model_type="roberta", position_ids_from_mask=True,
                                      pad_token_id=1, type_vocab_size=1),
           "DistilBertForMaskedLM": dict(model_type="distilbert", type_vocab_size=0)}
  cfg = ModelConfig(architectures=[arch], tie_word_embeddings=False, **SMALL,
                    **extra.get(arch, {}))
  model = build_model(cfg)
  model.save_pretrained(str(tmp_path))
  saved = tensors(str(tmp_path))
  assert set(decoder) <= set(saved)
  again = jaxlm.from_pretrained(str(tmp_path))
  assert again.config.tie_word_embeddings is False
  ids = np.arange(3, 23).reshape(2, 10)
  np.testing.assert_array_equal(model(ids).logits, again(ids).logits)


def test_prefixed_and_legacy_names_are_accepted(loaded, tmp_path):
  def legacy(t):  # BertModel saved with the "bert." prefix and TF-era gamma/beta
    rename = lambda k: k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
        "LayerNorm.bias", "LayerNorm.beta")
    return {"bert." + rename(k): v for k, v in t.items()}
  model = jaxlm.from_pretrained(broken_copy(tmp_path, "bert", legacy))
  a, b = flat_params(model), flat_params(loaded["bert"])
  assert all(np.array_equal(a[k], b[k]) for k in a)

  def unprefixed(t):  # a head model without the prefix, plus an old saved buffer
    out = {k.removeprefix("distilbert."): v for k, v in t.items()}
    out["embeddings.position_ids"] = np.arange(64)[None]
    return out
  model = jaxlm.from_pretrained(broken_copy(tmp_path, "distilbert_mlm", unprefixed))
  a, b = flat_params(model), flat_params(loaded["distilbert_mlm"])
  assert all(np.array_equal(a[k], b[k]) for k in a)


def legacy_layer_norm_names(t):
  """TF-era spellings: every LayerNorm weight/bias as gamma/beta."""
  return {re.sub(r"(LayerNorm|layer_norm)\.weight$", r"\1.gamma",
                 re.sub(r"(LayerNorm|layer_norm)\.bias$", r"\1.beta", k)): v
          for k, v in t.items()}


@pytest.mark.parametrize("name", ["bert_pretraining", "roberta_mlm", "distilbert_mlm"])
def test_legacy_gamma_beta_names_load_identically(loaded, tmp_path, name):
  d = broken_copy(tmp_path, name, legacy_layer_norm_names)
  assert any(k.endswith(".gamma") for k in tensors(d))
  assert not any(k.endswith("LayerNorm.weight") for k in tensors(d))
  model = jaxlm.from_pretrained(d)
  a, b = flat_params(model), flat_params(loaded[name])
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  model.save_pretrained(str(tmp_path / "out"))  # written back with transformers' names
  assert tensors(str(tmp_path / "out")).keys() == tensors(fixture(name)).keys()


def test_both_spellings_of_one_tensor_refused(tmp_path):
  name = "bert.embeddings.LayerNorm.weight"
  d = broken_copy(tmp_path, "bert_mlm", lambda t: {**t, name.replace("weight", "gamma"): t[name]})
  with pytest.raises(DataError, match=re.escape(name)):
    jaxlm.from_pretrained(d)


@pytest.mark.parametrize("name, head", [("bert_mlm", "cls.predictions"),
                                        ("bert_pretraining", "cls.predictions"),
                                        ("roberta_mlm", "lm_head")])
def test_vocab_bias_under_the_tied_decoder_name(loaded, tmp_path, name, head):
  def only_decoder_bias(t):
    t = dict(t)
    t[f"{head}.decoder.bias"] = t.pop(f"{head}.bias")
    return t
  model = jaxlm.from_pretrained(broken_copy(tmp_path / "only", name, only_decoder_bias))
  a, b = flat_params(model), flat_params(loaded[name])
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  # Both names present: the same tensor, read once.
  both = broken_copy(tmp_path / "both", name,
                     lambda t: {**t, f"{head}.decoder.bias": t[f"{head}.bias"]})
  a = flat_params(jaxlm.from_pretrained(both))
  assert all(np.array_equal(a[k], b[k]) for k in a)


def test_head_checkpoint_loads_into_classes_with_fewer_parts(loaded, tmp_path):
  """A BertForPreTraining file read as BertModel skips cls.* (and as BertForMaskedLM the
  pooler and NSP head), as transformers does."""
  src = fixture("bert_pretraining")
  full = flat_params(loaded["bert_pretraining"])
  for arch in ("BertModel", "BertForMaskedLM"):
    d = tmp_path / arch
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": [arch]}))
    got = flat_params(jaxlm.from_pretrained(str(d)))
    prefix = "" if arch == "BertModel" else "bert."
    assert ("pooler.kernel" in got) == (arch == "BertModel")
    assert "nsp.classifier.kernel" not in got
    for k, v in got.items():
      want = full[k if k.startswith("mlm.") else "bert." + k.removeprefix(prefix)]
      assert np.array_equal(v, want), k


@pytest.mark.parametrize("name, extra", [
    ("bert_mlm", "bert.encoder.layer.2.attention.self.query.weight"),
    ("bert", "encoder.layer.2.output.dense.bias"),
    ("roberta_mlm", "roberta.encoder.layer.0.attention.self.extra.bias"),
    ("bert", "embeddings.LayerNorm.gamma_typo"),
])
def test_extra_encoder_tensor_is_named(tmp_path, name, extra):
  d = broken_copy(tmp_path, name, lambda t: {**t, extra: np.zeros(32, np.float32)})
  with pytest.raises(DataError, match=f"unexpected tensor '{re.escape(extra)}'"):
    jaxlm.from_pretrained(d)


# ---- errors ----------------------------------------------------------------------------------
def test_pickle_checkpoint_refused_with_conversion_hint(tmp_path):
  shutil.copy(os.path.join(fixture("bert"), "config.json"), tmp_path)
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
  with pytest.raises(DataError, match="pytorch_model.bin") as e:
    jaxlm.from_pretrained(str(tmp_path))
  assert "never unpickles" in str(e.value) and "save_pretrained" in str(e.value)


def test_pickle_only_fixture_refused():
  with pytest.raises(JaxlmError):
    jaxlm.from_pretrained(fixture("pickle_only"))


def test_unknown_architecture_named(tmp_path):
  d = tmp_path / "x"
  shutil.copytree(fixture("bert"), d)
  cfg = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertForTelepathy"]}))
  with pytest.raises(JaxlmError, match="BertForTelepathy"):
    jaxlm.from_pretrained(str(d))


def test_missing_tensor_named(tmp_path):
  name = "bert.encoder.layer.1.output.dense.weight"
  d = broken_copy(tmp_path, "bert_mlm", lambda t: {k: v for k, v in t.items() if k != name})
  with pytest.raises(DataError, match=f"missing tensor '{name}'"):
    jaxlm.from_pretrained(d)


def test_base_model_without_pooler_loads_with_a_fresh_one_and_a_warning(loaded, tmp_path,
                                                                       capfd):
  """transformers' BertModel / RobertaModel initialize a missing pooler and warn."""
  d = broken_copy(tmp_path, "bert", lambda t: {k: v for k, v in t.items() if "pooler" not in k})
  capfd.readouterr()
  model = jaxlm.from_pretrained(d)
  err = capfd.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "warning:" in err[0] and "pooler.kernel" in err[0] and \
      "newly initialized" in err[0]
  full, _ = run(loaded["bert"], "bert")
  out, _ = run(model, "bert")
  np.testing.assert_array_equal(out.last_hidden_state, full.last_hidden_state)
  fresh = build_model(model.config, seed=0)  # the pooler is the model's own init
  np.testing.assert_array_equal(model.pooler.kernel.get_value(), fresh.pooler.kernel.get_value())
  assert not np.allclose(out.pooler_output, full.pooler_output)
  # A RobertaModel from a masked-LM checkpoint (no pooler, a head it ignores) loads too.
  r = tmp_path / "roberta"
  shutil.copytree(fixture("roberta_mlm"), r)
  cfg = json.loads((r / "config.json").read_text())
  (r / "config.json").write_text(json.dumps({**cfg, "architectures": ["RobertaModel"]}))
  roberta = jaxlm.from_pretrained(str(r))
  assert "pooler" in capfd.readouterr().err and roberta.config.architectures == ["RobertaModel"]
  # A class whose pooler is its head still needs it.
  with pytest.raises(DataError, match="missing tensor 'bert.pooler.dense.weight'"):
    jaxlm.from_pretrained(broken_copy(tmp_path, "bert_pretraining", lambda t: {
        k: v for k, v in t.items() if "pooler" not in k}))


def test_shape_mismatch_named(tmp_path):
  name = "lm_head.dense.weight"
  d = broken_copy(tmp_path, "roberta_mlm", lambda t: {**t, name: np.zeros((32, 31), np.float32)})
  with pytest.raises(DataError, match=rf"'{name}' has shape \(32, 31\), expected \(32, 32\)"):
    jaxlm.from_pretrained(d)


def test_extra_layer_is_unexpected(tmp_path):
  def extra(t):
    return {**t, "transformer.layer.2.ffn.lin1.bias": np.zeros(64, np.float32)}
  with pytest.raises(DataError, match="unexpected tensor 'transformer.layer.2.ffn.lin1.bias'"):
    jaxlm.from_pretrained(broken_copy(tmp_path, "distilbert", extra))


def test_config_transformers_cannot_express_falls_back_to_a_jaxlm_export(tmp_path):
  model = build_model(ModelConfig(architectures=["BertForPreTraining"],
                                  position_embedding_type="rope", **SMALL))
  with pytest.raises(ConfigError, match="position_embedding_type='rope'"):
    family_of("BertForPreTraining", "test").config_to_hf(model.config, "BertForPreTraining")
  assert model.save_pretrained(str(tmp_path / "out")) == "jaxlm"
  again = jaxlm.from_pretrained(str(tmp_path / "out"))
  ids = jnp.asarray(np.arange(12).reshape(2, 6) + 5)
  np.testing.assert_array_equal(model(ids).logits, again(ids).logits)


def test_unsupported_hf_config_named(tmp_path):
  d = tmp_path / "x"
  shutil.copytree(fixture("bert"), d)
  cfg = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps({**cfg, "position_embedding_type": "relative_key"}))
  with pytest.raises(ConfigError, match="position_embedding_type='relative_key'"):
    jaxlm.from_pretrained(str(d))
