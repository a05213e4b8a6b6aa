"""Phi-3 and DBRX against transformers' outputs on the tiny fixtures (tests/fixtures/hf):
logits, exact HF-format round trips, greedy generation, parameter counts and DBRX's
load-balancing loss; then what sets them apart: fused tensors, longrope's factor switch
and attention factor, clip_qkv, the p-norm router, the Pallas kernel, and one-line errors
for what jaxlm does not implement."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlm
from conftest import fixture, pallas_vs_xla
from jaxlm import ConfigError
from jaxlm.generate.request import switch_step
from jaxlm.hf import family_of, read_hf_config
from jaxlm.layers.attention import Attention, MaskSpec, dot_product_attention
from jaxlm.layers.moe import route
from jaxlm.layers.position import RoPE, rope_inv_freq
from test_hf_decoders import (check_round_trip, edited_copy, inputs, legacy_copy,
                              real_diff, rel_err)

# plain RoPE, partial rotary 0.5, GQA, window 5, untied; longrope past its original length 8
# (long factors), MHA, tied; longrope within 16 (short factors; generation crosses 16),
# explicit factor, MQA
PHI3 = ("phi3", "phi3_longrope", "phi3_longrope_switch")
# clip 1.0, 4 experts top-2, p = 1; clip 8.0, 8 experts top-3, p = 2, MQA
DBRX = ("dbrx", "dbrx_b")
NAMES = PHI3 + DBRX
CASES = [(n, False) for n in NAMES] + [(n, True) for n in PHI3]  # + config.legacy.json


@pytest.fixture(scope="module")
def loaded():
  return {name: jaxlm.from_pretrained(fixture(name)) for name in NAMES}


def hf_config(name, edit=lambda c: c):
  raw = read_hf_config(fixture(name))
  return family_of(raw["architectures"][0], "test").config_from_hf(edit(raw))


# ---- parity with transformers --------------------------------------------------------------
@nnx.jit
def _outputs(model, ids, mask):
  out = model(ids, mask)
  return out.logits, out.aux_loss


def outputs(model, name):
  """(logits, aux_loss or None) on the fixture's inputs; one compile per config, shared
  by every test (a reloaded model has the same graph)."""
  x = inputs(name)
  got, aux = _outputs(model, jnp.asarray(x["input_ids"]), jnp.asarray(x["attention_mask"]))
  return np.asarray(got), aux


@pytest.mark.parametrize("name,legacy", CASES, ids=[n + ("-legacy" if l else "") for n, l in CASES])
def test_logits_match_transformers(loaded, tmp_path, name, legacy):
  """Logits on the right-padded batch; for DBRX also the load-balancing loss over the real
  tokens (transformers' aux_loss)."""
  model = jaxlm.from_pretrained(legacy_copy(tmp_path, name)) if legacy else loaded[name]
  got, aux = outputs(model, name)
  diff, tol = real_diff(got, name)
  assert diff <= tol, f"{name}: max|Δ| {diff:.3g} > {tol:.3g}"
  want = np.load(os.path.join(fixture(name), "expected.npz"))
  assert (aux is None) == ("aux_loss" not in want.files)
  if aux is not None:
    assert abs(float(aux) - float(want["aux_loss"][0])) <= 1e-5 * float(want["aux_loss"][0])


@pytest.mark.parametrize("name", PHI3)
def test_legacy_spelling_gives_the_same_config(name):
  with open(os.path.join(fixture(name), "config.legacy.json")) as f:
    legacy = json.load(f)  # "su" longrope, rope_theta / partial factor at the top level
  assert hf_config(name, lambda _: legacy) == hf_config(name)


@pytest.mark.parametrize("name", NAMES)
def test_save_pretrained_round_trip(loaded, tmp_path, name):
  """Lossless, with qkv_proj / gate_up_proj / Wqkv and DBRX's w1 / v1 / w2 fused again."""
  check_round_trip(loaded[name], str(tmp_path / name), name, lambda m: outputs(m, name)[0])


@pytest.mark.parametrize("name", [n if n in PHI3 else pytest.param(n, marks=pytest.mark.slow)
                                  for n in NAMES])
def test_greedy_matches_transformers_generate(loaded, name):
  """transformers' greedy generate on a left-padded batch (make_generation.py): the KV
  cache, the sliding window (phi3) and longrope long from the prefill on (phi3_longrope),
  or short until step 7 crosses the switch at 16, where transformers recomputes the whole
  sequence (phi3_longrope_switch; without the recompute, tokens differ from step 7 on)."""
  from jaxlm.generate import generate
  g = np.load(os.path.join(fixture(name), "generate.npz"))
  got = generate(loaded[name], g["input_ids"], attention_mask=g["attention_mask"],
                 max_new_tokens=int(g["max_new_tokens"]), eos_token_id=int(g["eos_token_id"]),
                 pad_token_id=int(g["pad_token_id"]))
  want = g["sequences"]
  assert (g["attention_mask"][:, 0] == 0).any() and g["stopped"].any()
  np.testing.assert_array_equal(got[:, :want.shape[1]], want)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_matches_transformers(loaded, name):
  from jaxlm.params import flat_params
  with open(os.path.join(fixture(""), "versions.json")) as f:
    want = json.load(f)["families"][name]["num_parameters"]  # transformers' num_parameters()
  assert sum(v.size for v in flat_params(loaded[name]).values()) == want


# ---- what the configs turn into --------------------------------------------------------------
def test_configs_say_what_transformers_does():
  p = hf_config("phi3")
  assert (p.partial_rotary_factor, p.sliding_window, p.kv_heads, p.rope_scaling) == (
      0.5, 5, 2, None)
  long = hf_config("phi3_longrope")
  assert long.rope_scaling["original_max_position_embeddings"] == 8 and long.tie_word_embeddings
  switch = hf_config("phi3_longrope_switch")
  assert switch.rope_scaling["factor"] == 2.0 and switch.kv_heads == 1
  d, b = hf_config("dbrx"), hf_config("dbrx_b")
  assert (d.clip_qkv, d.router_norm_p, d.num_local_experts, d.num_experts_per_tok) == (
      1.0, 1.0, 4, 2)
  assert (b.clip_qkv, b.router_norm_p, b.num_local_experts, b.num_experts_per_tok) == (
      8.0, 2.0, 8, 3)
  assert (d.norm_type, d.norm_bias, d.router_aux_loss_coef, d.rope_theta) == (
      "layernorm", False, 0.05, 500000.0)
  none = hf_config("dbrx", lambda c: {**c, "ffn_config": {
      **c["ffn_config"], "moe_normalize_expert_weights": None}})
  assert none.router_norm_p is None


def test_longrope_attention_factor_and_switch():
  """cos/sin carry sqrt(1 + ln(factor) / ln(original)) (factor: given, or max / original),
  and one call rotates with the long factors iff its largest position is >= original."""
  long = RoPE.create(8, scaling=hf_config("phi3_longrope").rope_scaling,
                     max_position_embeddings=64)
  af = dict(long.scaling)["attention_factor"]
  assert af == pytest.approx(math.sqrt(2.0))  # factor 64 / 8
  short_cfg = hf_config("phi3_longrope_switch")
  short = RoPE.create(8, partial_rotary_factor=0.5, scaling=short_cfg.rope_scaling,
                      max_position_embeddings=128)
  assert dict(short.scaling)["attention_factor"] == pytest.approx(
      math.sqrt(1 + math.log(2.0) / math.log(16)))  # the explicit factor 2, not 128 / 16
  base = rope_inv_freq(8)
  for last, factors in ((7, [1.0, 1.25, 2.5, 6.0]), (8, [1.5, 4.0, 12.0, 40.0])):
    pos = jnp.array([[1, last]])
    cos, sin = (np.asarray(t) for t in long(pos))
    angle = 1 * base / np.asarray(factors, np.float32)  # position 1 of that call
    np.testing.assert_allclose(cos[0, 0, :4], af * np.cos(angle), rtol=1e-6)
    np.testing.assert_allclose(sin[0, 0, 4:], af * np.sin(angle), rtol=1e-6)


def test_longrope_prefix_differs_from_the_long_call(loaded):
  """The first 8 tokens alone rotate the short way, inside a 12-token call the long way:
  their logits differ (transformers does the same; the fixture pins the 12-token call)."""
  model, x = loaded["phi3_longrope"], inputs("phi3_longrope")
  full = outputs(model, "phi3_longrope")[0][0, :8]
  alone = np.asarray(nnx.jit(lambda m, i: m(i).logits)(model, jnp.asarray(x["input_ids"][:1, :8])))
  assert np.abs(alone[0] - full).max() > 0.1


def test_paths_without_the_recompute_refuse_to_cross_the_switch(loaded):
  """jaxlm.generate recomputes the cache where a generation crosses the longrope switch
  (test_greedy_matches_transformers_generate[phi3_longrope_switch]); stream, speculative
  decoding and the serving engine cannot, and refuse such requests in one line."""
  model = loaded["phi3_longrope_switch"]  # switch at 16
  cfg = model.config
  assert switch_step(cfg, 10, 7, recompute=False) is None  # last input at 15: short
  assert switch_step(cfg, 17, 9, recompute=False) is None  # long from the prefill on
  assert switch_step(cfg, 10, 8, recompute=True) == 7  # input 16 at new-token step 7
  with pytest.raises(ConfigError, match="original_max_position_embeddings=16") as e:
    switch_step(cfg, 10, 8, recompute=False)
  assert "\n" not in str(e.value)
  from jaxlm.generate import stream
  with pytest.raises(ConfigError, match="at most 7 tokens"):
    next(stream(model, np.arange(5, 15)[None], max_new_tokens=12))
  from jaxlm.serve.engine import Engine
  with pytest.raises(ConfigError, match="max_len=64"):
    Engine(model, slots=2, max_len=64)


# ---- shared pieces -----------------------------------------------------------------------------
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, None])
def test_router_renormalizes_by_the_p_norm(p):
  logits_NE = jax.random.normal(jax.random.key(0), (5, 8))
  w, idx = (np.asarray(a) for a in route(logits_NE, 3, p))
  probs = np.asarray(jax.nn.softmax(logits_NE, -1))
  top = np.take_along_axis(probs, idx, 1)
  want = top if p is None else top / (top ** p).sum(-1, keepdims=True) ** (1 / p)
  np.testing.assert_allclose(w, want, rtol=1e-6)
  assert (np.argsort(-probs, 1)[:, :3] == idx).all()


def test_clip_qkv_clamps_q_k_and_v():
  """Attention(clip=c) equals attention over projections clamped to [-c, c] (q, k and v
  alike: a clamp on k or v alone gives other outputs); dbrx's sensitivity in
  versions.json (2.06 without its clip 1.0) shows the fixture catches a missing clip."""
  x_BTD = 3.0 * jax.random.normal(jax.random.key(1), (2, 5, 16))
  kw = dict(num_kv_heads=2, use_bias=False, init_std=0.5)  # same seed: same weights
  clipped = Attention(16, 4, clip=0.5, rngs=nnx.Rngs(0), **kw)
  plain = Attention(16, 4, rngs=nnx.Rngs(0), **kw)
  spec = MaskSpec.build(5, causal=True)
  _, got = clipped(x_BTD, mask=spec)

  def proj(dense, n):
    return jnp.clip(dense(x_BTD), -0.5, 0.5).reshape(2, 5, n, 4)

  out = dot_product_attention(proj(plain.q, 4), proj(plain.k, 2), proj(plain.v, 2),
                              spec.dense(5, 5))
  np.testing.assert_allclose(got, plain.o(out.reshape(2, 5, 16)), rtol=1e-5, atol=1e-6)
  assert np.abs(got - plain(x_BTD, mask=spec)[1]).max() > 0.1


@pytest.mark.parametrize("name,grads", [("phi3", True),
                                        pytest.param("dbrx", False, marks=pytest.mark.slow)])
def test_pallas_matches_xla(loaded, name, grads):
  """attention_impl="pallas" (interpret mode on CPU) equals the XLA reference within 2e-5
  (relative to max(1, |x|)): phi3's logits and every gradient (window, partial rotary,
  GQA), dbrx's logits (clipped projections, experts; forward only, to keep this fast)."""
  model = loaded[name]
  logits_err, grads_err, live, _ = pallas_vs_xla(model.config, nnx.state(model, nnx.Param),
                                                 name, grads=grads)
  assert logits_err <= 2e-5 and grads_err <= 2e-5 and live


# ---- errors: what jaxlm does not implement is named, never ignored -----------------------------
def _rope(c, **kw):
  return {**c, "rope_parameters": {**c["rope_parameters"], **kw}}


@pytest.mark.parametrize("name,edit,needle", [
    ("phi3", lambda c: _rope(c, rope_type="dynamic", factor=2.0), "rope type 'dynamic'"),
    ("phi3_longrope", lambda c: {**c, "rope_parameters": {
        k: v for k, v in c["rope_parameters"].items() if k != "long_factor"}}, "long_factor"),
    ("phi3_longrope", lambda c: _rope(c, short_factor=[1.0, 2.0]), "short_factor"),
    ("phi3", lambda c: {**c, "head_dim": 16}, "head_dim=16"),
    ("phi3", lambda c: {**c, "embd_pdrop": 0.1}, "embd_pdrop"),
    ("dbrx", lambda c: {**c, "ffn_config": {**c["ffn_config"], "hidden_size": 64}},
     "ffn_config.hidden_size"),
    ("dbrx", lambda c: {**c, "ffn_config": {**c["ffn_config"], "moe_jitter_eps": 0.01}},
     "moe_jitter_eps"),
    ("dbrx", lambda c: {**c, "ffn_config": {**c["ffn_config"], "ffn_act_fn": {
        "name": "silu", "approximate": True}}}, "ffn_act_fn"),
    ("dbrx", lambda c: {**c, "attn_config": {**c["attn_config"], "rope_theta": 10000.0}},
     "attn_config.rope_theta"),
    ("dbrx", lambda c: {**c, "tie_word_embeddings": True}, "tie_word_embeddings"),
    ("dbrx", lambda c: {**c, "ffn_config": {**c["ffn_config"],
                                            "moe_normalize_expert_weights": -1.0}},
     "moe_normalize_expert_weights"),
], ids=["rope-type", "no-long-factor", "factor-length", "head-dim", "embd-pdrop",
        "ffn-hidden-size", "jitter", "act-fn", "old-rope-theta", "tied", "norm-p"])
def test_unsupported_options_are_one_line_errors_naming_the_key(tmp_path, name, edit, needle):
  with pytest.raises(ConfigError, match=needle) as e:
    hf_config(name, edit)
  assert "\n" not in str(e.value)
  d = edited_copy(tmp_path, name, edit_config=edit)
  with pytest.raises(ConfigError, match=needle):
    jaxlm.from_pretrained(d)


def test_options_other_classes_cannot_express_are_refused_on_export(loaded):
  llama = jaxlm.from_pretrained(fixture("llama")).config
  with pytest.raises(ConfigError, match="model.clip_qkv="):
    family_of("LlamaForCausalLM", "t").config_to_hf(llama.replace(clip_qkv=2.0),
                                                    "LlamaForCausalLM")
  # longrope: only Phi-3's class recomputes its cache at the switch, as jaxlm.generate does
  longrope = loaded["phi3_longrope"].config.rope_scaling
  with pytest.raises(ConfigError, match="longrope cannot be saved as llama"):
    family_of("LlamaForCausalLM", "t").config_to_hf(llama.replace(rope_scaling=longrope),
                                                    "LlamaForCausalLM")
  raw = read_hf_config(fixture("llama"))
  with pytest.raises(ConfigError, match="rope type 'longrope' is not supported"):
    family_of("LlamaForCausalLM", "t").config_from_hf({**raw, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4,
        "long_factor": [2.0] * 4, "original_max_position_embeddings": 8}})
  mixtral = jaxlm.from_pretrained(fixture("mixtral")).config
  with pytest.raises(ConfigError, match="model.router_norm_p="):
    family_of("MixtralForCausalLM", "t").config_to_hf(mixtral.replace(router_norm_p=2.0),
                                                      "MixtralForCausalLM")
  dbrx = loaded["dbrx"].config
  with pytest.raises(ConfigError, match="model.sliding_window="):
    family_of("DbrxForCausalLM", "t").config_to_hf(dbrx.replace(sliding_window=4),
                                                   "DbrxForCausalLM")
