"""Decoder families (GPT-2, Llama, Mistral, BLOOM, MPT, GPT-NeoX, Qwen2, Qwen3, Gemma, Gemma 2,
Gemma 3, Falcon, Cohere)
against transformers' outputs on the tiny fixtures (tests/fixtures/hf), HF-format round
trips, greedy generation, the position encodings (RoPE, ALiBi), sliding windows, packed
sequences and named errors."""

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import jaxlm
from conftest import fixture
from jaxlm import ConfigError, DataError
from jaxlm.hf import family_of, read_hf_config
from jaxlm.layers.attention import Attention, dot_product_attention
from jaxlm.layers.position import alibi_slopes, apply_rope, rope_cos_sin, rope_inv_freq
from jaxlm.models.decoder import segment_positions

# full attention, untied; all layers sliding (W=4), tied; full/sliding/sliding (W=4), untied
QWEN2 = ("qwen2", "qwen2_tied", "qwen2_mixed")
# q/k norm, tied, full attention; + q/k/v/o biases, sliding/full/sliding W=4, untied
# (more in test_hf_qwen.py)
QWEN3 = ("qwen3", "qwen3_b")
# Falcon: old multi-head, multi-query, new architecture (GQA, two norms), ALiBi (sequential);
# Cohere: without and with q/k norms (more in test_hf_falcon_cohere.py)
FALCON_COHERE = ("falcon", "falcon_mq", "falcon_new", "falcon_alibi", "cohere", "cohere_qk")
# tied, MQA, legacy "gelu"; biases, untied; sliding/full/sliding W=4 with both soft caps;
# full/sliding/full W=6, final cap only, untied; Gemma 3: sliding/sliding/full W=4 with local
# and global RoPE bases; full/sliding/sliding/full W=6, linear scaling on the global layers,
# final cap, biases, untied (more in test_hf_gemma.py)
GEMMA = ("gemma", "gemma_b", "gemma2", "gemma2_b", "gemma3", "gemma3_b")
FAMILIES = ("gpt2", "llama", "llama3_scaling", "mistral", "bloom", "mpt", "gpt_neox",
            "llama_sharded") + QWEN2 + QWEN3 + GEMMA + FALCON_COHERE
LEGACY = ("llama", "llama3_scaling", "mistral", "gpt_neox") + QWEN2 + QWEN3 + GEMMA + FALCON_COHERE
# (LEGACY: have config.legacy.json)
CASES = [(f, False) for f in FAMILIES] + [(f, True) for f in LEGACY]


def legacy_copy(tmp_path, name):
  """The fixture with its transformers-4 style config.legacy.json as config.json."""
  d = tmp_path / f"{name}_legacy"
  shutil.copytree(fixture(name), d)
  shutil.copy(d / "config.legacy.json", d / "config.json")
  return str(d)


def inputs(name):
  return dict(np.load(os.path.join(fixture(name), "inputs.npz")))


@nnx.jit
def _forward(model, ids, mask, segment_ids, rngs):
  return model(ids, mask, segment_ids=segment_ids, rngs=rngs).logits


def forward(model, ids, mask=None, *, segment_ids=None, rngs=None):
  """Logits as NumPy; jitted because one compile beats eager dispatch per new shape."""
  return np.asarray(_forward(model, jnp.asarray(ids), None if mask is None else jnp.asarray(mask),
                             None if segment_ids is None else jnp.asarray(segment_ids), rngs))


def logits(model, name):
  x = inputs(name)
  return forward(model, x["input_ids"], x["attention_mask"])


def real_diff(got, name):
  """max |got - expected| over real (attention_mask == 1) positions, and the tolerance."""
  want = np.load(os.path.join(fixture(name), "expected.npz"))["logits"]
  real = inputs(name)["attention_mask"].astype(bool)
  return np.abs(got - want)[real].max(), 1e-4 * max(1.0, np.abs(want).max())


def tensor_shapes(directory):
  """{name: shape} over every safetensors file of a checkpoint dir (headers only)."""
  out = {}
  for f in sorted(os.listdir(directory)):
    if f.endswith(".safetensors"):
      with safe_open(os.path.join(directory, f), "np") as st:
        out.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
  return out


def is_subset(written, reference):
  """Every key we write that the reference has carries the same value (nested dicts too)."""
  for k, v in written.items():
    if k not in reference:
      continue
    r = reference[k]
    if isinstance(v, dict) and isinstance(r, dict):
      if not is_subset(v, r):
        return False
    elif v != r:
      return False
  return True


def check_round_trip(model, out, name, forward):
  """save_pretrained -> from_pretrained gives the same logits (`forward(model)`), the tensor
  names and shapes transformers wrote (fused tensors fused again, tied heads absent) and a
  config.json that reads as the same model."""
  model.save_pretrained(out)
  again = jaxlm.from_pretrained(out)
  np.testing.assert_array_equal(forward(again), forward(model))
  assert tensor_shapes(out) == tensor_shapes(fixture(name))
  saved, ref = read_hf_config(out), read_hf_config(fixture(name))
  assert saved["architectures"] == ref["architectures"]
  assert saved["model_type"] == ref["model_type"]
  assert is_subset(saved, ref), {k: (v, ref.get(k)) for k, v in saved.items() if v != ref.get(k)}
  fam = family_of(ref["architectures"][0], out)
  assert fam.config_from_hf(saved) == fam.config_from_hf(ref)


def rel_err(a, b):
  """max |a - b| / max(1, |b|)."""
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / np.maximum(1.0, np.abs(b))))


@pytest.fixture(scope="module")
def loaded():
  return {name: jaxlm.from_pretrained(fixture(name)) for name in FAMILIES}


# ---- parity with transformers --------------------------------------------------------------
@pytest.mark.parametrize("name,legacy", CASES, ids=[f + ("-legacy" if l else "") for f, l in CASES])
def test_logits_match_transformers(loaded, tmp_path, name, legacy):
  model = jaxlm.from_pretrained(legacy_copy(tmp_path, name)) if legacy else loaded[name]
  diff, tol = real_diff(logits(model, name), name)
  assert diff <= tol, f"{name}: max|Δ| {diff:.3g} > {tol:.3g}"


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_and_v5_rope_spellings_give_one_config(name):
  d = fixture(name)
  fam = family_of(read_hf_config(d)["architectures"][0], d)
  with open(os.path.join(d, "config.legacy.json")) as f:
    legacy = json.load(f)
  assert fam.config_from_hf(legacy) == fam.config_from_hf(read_hf_config(d))


# ---- round trip ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_save_pretrained_round_trip(loaded, tmp_path, name):
  check_round_trip(loaded[name], str(tmp_path / name), name, lambda m: logits(m, name))


def test_tied_head_copy_in_checkpoint_is_accepted(tmp_path):
  d = tmp_path / "gpt2"
  shutil.copytree(fixture("gpt2"), d)
  t = load_file(str(d / "model.safetensors"))
  t["lm_head.weight"] = t["transformer.wte.weight"]  # older transformers saved both
  save_file(t, str(d / "model.safetensors"))
  diff, tol = real_diff(logits(jaxlm.from_pretrained(str(d)), "gpt2"), "gpt2")
  assert diff <= tol


def test_base_model_prefix_is_optional(tmp_path):
  d = tmp_path / "gpt_neox"
  shutil.copytree(fixture("gpt_neox"), d)
  t = load_file(str(d / "model.safetensors"))
  t = {k.removeprefix("gpt_neox."): v for k, v in t.items()}
  save_file(t, str(d / "model.safetensors"))
  diff, tol = real_diff(logits(jaxlm.from_pretrained(str(d)), "gpt_neox"), "gpt_neox")
  assert diff <= tol


# ---- errors ----------------------------------------------------------------------------------
def edited_copy(tmp_path, name, edit_tensors=None, edit_config=None):
  d = tmp_path / f"{name}_edited"
  tmp_path.mkdir(parents=True, exist_ok=True)
  shutil.copytree(fixture(name), d)
  if edit_tensors:
    save_file(edit_tensors(load_file(str(d / "model.safetensors"))), str(d / "model.safetensors"))
  if edit_config:
    cfg = edit_config(read_hf_config(str(d)))
    (d / "config.json").write_text(json.dumps(cfg))
  return str(d)


def test_missing_tensor_is_named(tmp_path):
  name = "model.layers.1.self_attn.k_proj.weight"
  d = edited_copy(tmp_path, "mistral", lambda t: {k: v for k, v in t.items() if k != name})
  with pytest.raises(DataError, match=name.replace(".", r"\.")):
    jaxlm.from_pretrained(d)


def test_fused_tensor_shape_mismatch_is_named(tmp_path):
  name = "transformer.h.0.self_attention.query_key_value.weight"
  d = edited_copy(tmp_path, "bloom", lambda t: {**t, name: t[name][:-6]})
  with pytest.raises(DataError, match=name.replace(".", r"\.")):
    jaxlm.from_pretrained(d)


def test_shape_mismatch_is_named(tmp_path):
  name = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
  d = edited_copy(tmp_path, "gpt_neox", lambda t: {**t, name: t[name][:64]})
  with pytest.raises(DataError, match=name.replace(".", r"\.")):
    jaxlm.from_pretrained(d)


def test_unexpected_tensor_is_named(tmp_path):
  d = edited_copy(tmp_path, "mpt", lambda t: {**t, "transformer.blocks.0.attn.extra": t[
      "transformer.norm_f.weight"]})
  with pytest.raises(DataError, match=r"transformer\.blocks\.0\.attn\.extra"):
    jaxlm.from_pretrained(d)


def test_unknown_architecture_is_a_data_error(tmp_path):
  d = edited_copy(tmp_path, "llama", edit_config=lambda c: {**c, "architectures": ["NopeLM"]})
  with pytest.raises(DataError, match="NopeLM"):
    jaxlm.from_pretrained(d)


def test_unsupported_rope_type_names_the_key(tmp_path):
  d = edited_copy(tmp_path, "llama", edit_config=lambda c: {
      **c, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}})
  with pytest.raises(ConfigError, match="yarn"):
    jaxlm.from_pretrained(d)


# ---- zoo III: generation and parameter counts ------------------------------------------------
@pytest.mark.parametrize("name", QWEN2 + QWEN3 + GEMMA + FALCON_COHERE)
def test_greedy_matches_transformers_generate(loaded, name):
  """transformers' greedy generate on a left-padded batch (make_generation.py)."""
  from jaxlm.generate import generate
  g = np.load(os.path.join(fixture(name), "generate.npz"))
  got = generate(loaded[name], g["input_ids"], attention_mask=g["attention_mask"],
                 max_new_tokens=int(g["max_new_tokens"]), eos_token_id=int(g["eos_token_id"]),
                 pad_token_id=int(g["pad_token_id"]))
  want = g["sequences"]
  assert (g["attention_mask"][:, 0] == 0).any()  # left padding in the batch
  assert g["stopped"].any() and not g["stopped"].all()
  np.testing.assert_array_equal(got[:, :want.shape[1]], want)
  assert (got[:, want.shape[1]:] == int(g["pad_token_id"])).all()


@pytest.mark.parametrize("name", QWEN2 + QWEN3 + GEMMA + FALCON_COHERE)
def test_parameter_count_matches_transformers(loaded, name):
  from jaxlm.params import flat_params
  with open(os.path.join(fixture(""), "versions.json")) as f:
    want = json.load(f)["families"][name]["num_parameters"]  # transformers' num_parameters()
  assert sum(v.size for v in flat_params(loaded[name]).values()) == want


# ---- Qwen2 ---------------------------------------------------------------------------------
def test_qwen2_biases_and_window_from_the_config(loaded):
  full, tied = loaded["qwen2"].config, loaded["qwen2_tied"].config
  assert (full.attention_bias, full.attention_out_bias, full.mlp_bias) == (True, False, False)
  assert full.sliding_window is None and not full.tie_word_embeddings
  assert tied.sliding_window == 4 and tied.tie_word_embeddings
  assert (tied.num_attention_heads, tied.kv_heads, tied.head_size) == (6, 2, 8)


def qwen2_config(edit):
  return family_of("Qwen2ForCausalLM", "test").config_from_hf(
      edit(read_hf_config(fixture("qwen2_tied"))))


def test_qwen2_layer_types_derived_as_transformers_does():
  """Without layer_types: sliding from layer max_window_layers on, if use_sliding_window."""
  def drop(c, **kw):
    return {**{k: v for k, v in c.items() if k != "layer_types"}, **kw}
  assert qwen2_config(lambda c: drop(c)).sliding_window == 4  # max_window_layers 0
  assert qwen2_config(lambda c: drop(c, max_window_layers=3)).sliding_window is None
  assert qwen2_config(lambda c: drop(c, use_sliding_window=False)).sliding_window is None


@pytest.mark.parametrize("edit", [
    lambda c: {**c, "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]},
    lambda c: {**{k: v for k, v in c.items() if k != "layer_types"}, "max_window_layers": 1}],
    ids=["explicit", "from-max_window_layers"])
def test_qwen2_mixed_layer_types_give_per_layer_windows(edit):
  assert qwen2_config(edit).layer_windows() == [None, 4, 4]


# ---- sliding window ------------------------------------------------------------------------
def one_layer_mistral(tmp_path, window):
  """The HF Mistral fixture cut to its first layer, with the given window."""
  def drop_layer_1(t):
    return {k: v for k, v in t.items() if ".layers.1." not in k}
  return jaxlm.from_pretrained(edited_copy(
      tmp_path / str(window), "mistral", drop_layer_1,
      lambda c: {**c, "num_hidden_layers": 1, "sliding_window": window}))


def test_sliding_window_one_layer_is_exact(tmp_path):
  """1 layer, window W: query t sees keys t-W+1..t only, so token p can move logits at
  t = p..p+W-1 and nowhere else."""
  W, p = 4, 2
  ids = inputs("mistral")["input_ids"][:1]
  changed = ids.copy()
  changed[0, p] = (ids[0, p] + 7) % 256

  def moved(model):
    return np.abs(forward(model, ids)[0] - forward(model, changed)[0]).max(-1)

  m = moved(one_layer_mistral(tmp_path, W))
  assert (m[:p] == 0).all() and (m[p + W:] == 0).all()
  assert (m[p:p + W] > 1e-4).all()
  # Without the window the same edit reaches every later position.
  assert (moved(one_layer_mistral(tmp_path, None))[p:] > 1e-4).all()


def test_sliding_window_fixture_beyond_receptive_field(loaded):
  """The 2-layer HF Mistral (W=4): information travels at most 2*(W-1) = 6 positions."""
  model = loaded["mistral"]
  W = model.config.sliding_window
  ids = inputs("mistral")["input_ids"][:1]
  changed = ids.copy()
  changed[0, 0] = (ids[0, 0] + 11) % 256
  moved = np.abs(forward(model, ids)[0] - forward(model, changed)[0]).max(-1)
  reach = 2 * (W - 1)
  assert (moved[reach + 1:] == 0).all()
  assert (moved[:W] > 1e-4).all()


# ---- packed sequences ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral", "bloom", "gpt_neox", "falcon_alibi",
                                  "cohere_qk"])
def test_packed_documents_match_separate_runs(loaded, name):
  model = loaded[name]
  rng = np.random.default_rng(0)
  doc_a, doc_b = rng.integers(3, 256, 5), rng.integers(3, 256, 4)
  packed = np.zeros((1, 12), np.int64)
  packed[0, :9] = np.concatenate([doc_a, doc_b])
  segments = np.array([[1] * 5 + [2] * 4 + [0] * 3])
  got = forward(model, packed, segment_ids=segments)[0]
  # Each document alone, right-padded (causal: padding cannot reach real positions).
  alone = np.zeros((2, 12), np.int64)
  alone[0, :5], alone[1, :4] = doc_a, doc_b
  want = forward(model, alone, (alone != 0).astype(np.int64))
  np.testing.assert_allclose(got[:5], want[0, :5], atol=1e-5)
  np.testing.assert_allclose(got[5:9], want[1, :4], atol=1e-5)


def test_segment_positions_restart():
  seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
  np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


# ---- RoPE ------------------------------------------------------------------------------------
@pytest.mark.parametrize("scaling,partial", [
    (None, 1.0), ({"rope_type": "linear", "factor": 4.0}, 1.0),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64}, 1.0), (None, 0.25)])
def test_rope_scores_depend_only_on_relative_position(scaling, partial):
  H = 32
  R = int(H * partial)
  q, k = np.random.default_rng(0).standard_normal((2, H), np.float32)

  def score(i, j):
    cos, sin = rope_cos_sin(jnp.array([[i, j]]), R, 500.0, scaling)
    x = apply_rope(jnp.stack([q, k])[None, :, None, :], cos, sin)[0, :, 0]
    return float(x[0] @ x[1])

  for i, j in [(5, 2), (9, 9), (3, 7)]:
    for shift in (1, 10, 37):
      assert math.isclose(score(i, j), score(i + shift, j + shift), rel_tol=1e-4, abs_tol=1e-4)
  assert not math.isclose(score(5, 2), score(5, 3), rel_tol=1e-3)


def test_rope_inverse_frequencies():
  np.testing.assert_allclose(rope_inv_freq(8, 10000.0), 10000.0 ** -(np.arange(0, 8, 2) / 8),
                             rtol=1e-6)
  np.testing.assert_allclose(rope_inv_freq(8, 10000.0, {"rope_type": "linear", "factor": 2.0}),
                             10000.0 ** -(np.arange(0, 8, 2) / 8) / 2, rtol=1e-6)


def test_attention_position_ids_equal_precomputed_rope():
  from jaxlm.layers.position import RoPE
  rope = RoPE.create(16, theta=1e4, partial_rotary_factor=0.5)
  attn = Attention(32, 2, rope=rope, rngs=nnx.Rngs(0))
  x = np.random.default_rng(1).standard_normal((2, 5, 32), np.float32)
  pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
  by_ids = nnx.jit(lambda m, x, p: m(x, position_ids=p)[1])(attn, x, pos)
  by_tables = nnx.jit(lambda m, x, p: m(x, rope=rope(p))[1])(attn, x, pos)
  np.testing.assert_allclose(by_ids, by_tables, atol=1e-6)


# ---- ALiBi -----------------------------------------------------------------------------------
def test_alibi_slopes_known_values():
  np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -i for i in range(1, 9)])
  # Not a power of two: 4 geometric slopes, then odd powers of the 8-head base.
  np.testing.assert_allclose(alibi_slopes(6),
                             [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 8, 12, 16, 20])
def test_alibi_slopes_match_mpt_rule(n):
  # MPT's build_mpt_alibi_tensor with alibi_bias_max=8.
  p2 = 2 ** math.ceil(math.log2(n))
  slopes = 1.0 / 2.0 ** (np.arange(1, p2 + 1) * (8 / p2))
  if p2 != n:
    slopes = np.concatenate([slopes[1::2], slopes[::2]])[:n]
  np.testing.assert_allclose(alibi_slopes(n), slopes, rtol=1e-6)


def test_attention_bias_is_added_per_head():
  rng = np.random.default_rng(2)
  q, k, v = (rng.standard_normal((1, 4, s, 8), np.float32) for s in (4, 2, 2))
  bias = rng.standard_normal((1, 4, 4, 4), np.float32)
  got = jax.jit(lambda *a: dot_product_attention(*a, None, bias=bias))(q, k, v)

  @jax.jit
  def reference(q, k, v):
    kr, vr = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q, kr) / np.sqrt(8) + bias
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, -1), vr)

  np.testing.assert_allclose(got, reference(q, k, v), atol=1e-5)


# ---- dropout ---------------------------------------------------------------------------------
def test_decoder_dropout_is_seeded(loaded):
  model = loaded["gpt2"]  # resid/attn dropout 0.1
  ids = inputs("gpt2")["input_ids"]
  a = forward(model, ids, rngs=nnx.Rngs(dropout=0))
  b = forward(model, ids, rngs=nnx.Rngs(dropout=0))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, forward(model, ids))
