"""T5 and T5 v1.1 (T5ForConditionalGeneration) against transformers' outputs on the tiny
fixtures (tests/fixtures/hf/t5, t5_v1_1), round trips, the relative-position buckets,
padding, bf16 and named errors."""

import json
import math
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import jaxlm
from conftest import fixture
from jaxlm import ConfigError, DataError, Runtime, build_model
from jaxlm.hf import family_of, read_hf_config
from jaxlm.layers.position import RelativePositionBias, relative_position_bucket

FAMILIES = ("t5", "t5_v1_1")


def inputs(name):
  return dict(np.load(os.path.join(fixture(name), "inputs.npz")))


def expected(name):
  return dict(np.load(os.path.join(fixture(name), "expected.npz")))


@nnx.jit
def _forward(model, ids, mask, dec, dec_mask):
  out = model(ids, mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
  return out.logits, out.encoder_last_hidden_state


def forward(model, x):
  """(logits, encoder_last_hidden_state) as NumPy for an inputs.npz-style dict."""
  args = [None if x.get(k) is None else jnp.asarray(x[k]) for k in
          ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")]
  return tuple(np.asarray(a) for a in _forward(model, *args))


def tensor_shapes(directory):
  with safe_open(os.path.join(directory, "model.safetensors"), "np") as st:
    return {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}


def edited_copy(tmp_path, name, edit_tensors=None, edit_config=None):
  d = tmp_path / f"{name}_edited"
  shutil.copytree(fixture(name), d)
  if edit_tensors:
    save_file(edit_tensors(load_file(str(d / "model.safetensors"))), str(d / "model.safetensors"))
  if edit_config:
    (d / "config.json").write_text(json.dumps(edit_config(read_hf_config(str(d)))))
  return str(d)


@pytest.fixture(scope="module")
def loaded():
  return {name: jaxlm.from_pretrained(fixture(name)) for name in FAMILIES}


@pytest.fixture(scope="module")
def outputs(loaded):
  return {name: forward(loaded[name], inputs(name)) for name in FAMILIES}


# ---- parity with transformers --------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(outputs, name):
  logits, enc = outputs[name]
  want = expected(name)
  # Every position, padded ones included: with right padding they are well defined.
  for key, got in (("logits", logits), ("encoder_last_hidden_state", enc)):
    tol = 1e-4 * max(1.0, np.abs(want[key]).max())
    diff = np.abs(got - want[key]).max()
    assert got.shape == want[key].shape and diff <= tol, f"{name} {key}: {diff:.3g} > {tol:.3g}"


def test_configs_read_as_t5_and_v1_1(loaded):
  t5, v11 = loaded["t5"].config, loaded["t5_v1_1"].config
  assert (t5.tie_word_embeddings, t5.mlp_type, t5.hidden_act) == (True, "plain", "relu")
  assert (v11.tie_word_embeddings, v11.mlp_type, v11.hidden_act) == (False, "gated", "gelu_new")
  assert (v11.num_hidden_layers, v11.decoder_layers, v11.head_size) == (2, 3, 16)
  assert loaded["t5"].lm_head is None and loaded["t5_v1_1"].lm_head is not None
  assert len(loaded["t5_v1_1"].decoder.layers) == 3


# ---- round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_hf_export_reloads_exactly(loaded, outputs, tmp_path, name):
  out = str(tmp_path / name)
  assert loaded[name].save_pretrained(out) == "hf"
  again = jaxlm.from_pretrained(out)
  for got, want in zip(forward(again, inputs(name)), outputs[name]):
    np.testing.assert_array_equal(got, want)
  # transformers' names and shapes: embed_tokens copies are never written, and a
  # separate head only for v1.1.
  assert tensor_shapes(out) == tensor_shapes(fixture(name))
  saved, ref = read_hf_config(out), read_hf_config(fixture(name))
  for key in ("d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
              "feed_forward_proj", "relative_attention_num_buckets",
              "relative_attention_max_distance", "decoder_start_token_id", "model_type",
              "scale_decoder_outputs", "architectures"):
    assert saved[key] == ref[key], key
  fam = family_of(ref["architectures"][0], out)
  assert fam.config_from_hf(saved) == fam.config_from_hf(ref)


def test_jaxlm_export_round_trip_is_exact(loaded, tmp_path):
  # Grouped K/V heads: runs in jaxlm but has no transformers T5 spelling -> jaxlm export.
  cfg = loaded["t5_v1_1"].config.replace(num_key_value_heads=2)
  model = build_model(cfg, seed=3)
  assert model.save_pretrained(str(tmp_path)) == "jaxlm"
  again = jaxlm.from_pretrained(str(tmp_path))
  x = inputs("t5_v1_1")
  for got, want in zip(forward(again, x), forward(model, x)):
    np.testing.assert_array_equal(got, want)


def test_hub_style_checkpoint_loads(loaded, outputs, tmp_path):
  """transformers-4 spelling: tie_word_embeddings=false instead of scale_decoder_outputs, and
  tied embed_tokens copies plus the unused cross-attention bias table in the file."""
  def add_copies(t):
    extra = {f"{s}.embed_tokens.weight": t["shared.weight"] for s in ("encoder", "decoder")}
    extra["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = t[
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    return {**t, **extra}

  def hub_config(c):
    c = {k: v for k, v in c.items() if k != "scale_decoder_outputs"}
    return {**c, "tie_word_embeddings": False, "n_positions": 512}

  model = jaxlm.from_pretrained(edited_copy(tmp_path, "t5_v1_1", add_copies, hub_config))
  assert model.config == loaded["t5_v1_1"].config
  np.testing.assert_array_equal(forward(model, inputs("t5_v1_1"))[0], outputs["t5_v1_1"][0])


def test_tied_head_copy_accepted_and_mismatch_named(tmp_path):
  same = edited_copy(tmp_path / "same", "t5", lambda t: {**t, "lm_head.weight": t["shared.weight"]})
  assert jaxlm.from_pretrained(same).lm_head is None
  other = edited_copy(tmp_path / "other", "t5",
                      lambda t: {**t, "lm_head.weight": t["shared.weight"] + 1.0})
  with pytest.raises(DataError, match=r"lm_head\.weight"):
    jaxlm.from_pretrained(other)


def test_untied_config_without_head_tensor_uses_shared(tmp_path):
  # transformers 5 saves an untied-but-equal head as `shared` only, and ties it on load.
  d = edited_copy(tmp_path, "t5_v1_1",
                  lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
  model = jaxlm.from_pretrained(d)
  np.testing.assert_array_equal(model.lm_head.kernel[...], model.shared.embedding[...].T)


def test_missing_bias_table_is_named(tmp_path):
  name = "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
  d = edited_copy(tmp_path, "t5", lambda t: {k: v for k, v in t.items() if k != name})
  with pytest.raises(DataError, match=name.replace(".", r"\.")):
    jaxlm.from_pretrained(d)


# ---- relative position buckets ---------------------------------------------------------------
def reference_bucket(rel, bidirectional, num_buckets, max_distance):
  """Mesh TensorFlow's rule, written out per element. In float32 like transformers: where
  the exact value is an integer (e.g. d = exact * (max_distance / exact)**k) float64 would
  truncate the other way."""
  out = []
  for r in np.ravel(rel):
    n, b = num_buckets, 0
    if bidirectional:
      n //= 2
      b = n if r > 0 else 0
      d = abs(r)
    else:
      d = max(-r, 0)
    exact = n // 2
    if d < exact:
      out.append(b + d)
    else:
      f32 = np.float32
      log = int(np.log(f32(d) / f32(exact)) / f32(math.log(max_distance / exact)) * f32(n - exact))
      out.append(b + min(exact + log, n - 1))
  return np.array(out).reshape(np.shape(rel))


def test_relative_position_bucket_hand_checked():
  # 32 buckets, max_distance 128 (every T5 checkpoint); identical to transformers'
  # T5Attention._relative_position_bucket. rel = key - query.
  rel = [0, 1, -1, 7, -7, 8, -8, -16, -32, -64, -100, -127, -128, -1000, 1000]
  both = [0, 17, 1, 23, 7, 24, 8, 10, 12, 14, 15, 15, 15, 15, 31]
  causal = [0, 0, 1, 0, 7, 0, 8, 16, 21, 26, 30, 31, 31, 31, 0]
  for bidirectional, want in ((True, both), (False, causal)):
    got = relative_position_bucket(jnp.array(rel), bidirectional=bidirectional)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 6), (16, 10), (64, 48)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bucket_matches_reference(num_buckets, max_distance, bidirectional):
  rel = np.arange(-300, 301)
  got = relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional,
                                 num_buckets=num_buckets, max_distance=max_distance)
  want = reference_bucket(rel, bidirectional, num_buckets, max_distance)
  np.testing.assert_array_equal(got, want)
  # Beyond max_distance everything shares the last bucket of its direction.
  far = np.abs(rel) >= max_distance
  top = num_buckets // 2 - 1 if bidirectional else num_buckets - 1
  assert (np.asarray(got)[far & (rel < 0)] == top).all()
  assert (np.asarray(got)[far & (rel > 0)] == (num_buckets - 1 if bidirectional else 0)).all()


def test_relative_bias_offsets_slice_the_full_table():
  """Queries at positions 5..7 against keys 0..7 (a KV cache) get rows 5..7 of the full
  bias; per-row positions give a per-row bias."""
  bias = RelativePositionBias(8, 3, bidirectional=False, max_distance=6, init_std=1.0,
                              rngs=nnx.Rngs(0))
  full = np.asarray(bias(jnp.arange(8), jnp.arange(8)))
  assert full.shape == (1, 3, 8, 8)
  np.testing.assert_array_equal(bias(jnp.arange(5, 8), jnp.arange(8)), full[:, :, 5:])
  table = np.asarray(bias.embedding[...])
  buckets = reference_bucket(np.arange(8)[None] - np.arange(8)[:, None], False, 8, 6)
  np.testing.assert_array_equal(full[0], table[buckets].transpose(2, 0, 1))
  rows = bias(jnp.array([[0, 1], [6, 7]]), jnp.array([[0, 1], [0, 1]]))
  assert rows.shape == (2, 3, 2, 2)
  np.testing.assert_array_equal(rows[0], full[0, :, :2, :2])


# ---- padding, bf16 -----------------------------------------------------------------------------
def test_encoder_padding_does_not_change_real_positions(loaded, outputs):
  """Row 1 of the fixture is right-padded (7 real encoder tokens, 6 real decoder tokens); run
  alone and unpadded it gives the same outputs. Pad slots hold random ids, not the pad id,
  so only the masks can hide them."""
  model, x = loaded["t5_v1_1"], inputs("t5_v1_1")
  logits, enc = outputs["t5_v1_1"]
  S, T = int(x["attention_mask"][1].sum()), int(x["decoder_attention_mask"][1].sum())
  alone = dict(input_ids=x["input_ids"][1:, :S], decoder_input_ids=x["decoder_input_ids"][1:, :T])
  got_logits, got_enc = forward(model, alone)
  np.testing.assert_allclose(got_logits[0], logits[1, :T], atol=1e-5)
  np.testing.assert_allclose(got_enc[0], enc[1, :S], atol=1e-5)
  junk = {k: v.copy() for k, v in x.items()}
  junk["input_ids"][1, S:] = np.arange(S, x["input_ids"].shape[1]) + 100
  junk["decoder_input_ids"][1, T:] = 200
  junk_logits, junk_enc = forward(model, junk)
  np.testing.assert_allclose(junk_logits[1, :T], logits[1, :T], atol=1e-5)
  np.testing.assert_allclose(junk_enc[1, :S], enc[1, :S], atol=1e-5)


def test_bf16_forward_close_to_fp32(loaded, outputs):
  f32 = loaded["t5"]
  bf16 = build_model(f32.config, runtime=Runtime(dtype="bfloat16"))
  nnx.update(bf16, nnx.state(f32, nnx.Param))
  got, _ = forward(bf16, inputs("t5"))
  want = outputs["t5"][0]
  err = np.abs(got - want).max() / np.abs(want).max()
  assert got.dtype == np.float32 and 0 < err < 0.03, err  # bf16 really used, and still close


# ---- bad configs --------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value", [("causal", True), ("position_embedding_type", "rope"),
                                       ("norm_type", "layernorm")])
def test_unsupported_config_names_the_key(loaded, key, value):
  cfg = loaded["t5"].config.replace(**{key: value})
  with pytest.raises(ConfigError, match=f"model.{key}="):
    build_model(cfg)


def test_unknown_feed_forward_proj_names_the_key(tmp_path):
  d = edited_copy(tmp_path, "t5", edit_config=lambda c: {**c, "feed_forward_proj": "gated-nope"})
  with pytest.raises(ConfigError, match="feed_forward_proj='gated-nope'"):
    jaxlm.from_pretrained(d)
