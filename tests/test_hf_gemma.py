"""Gemma, Gemma 2 and Gemma 3 beyond the parity checks every decoder gets in
test_hf_decoders.py (logits, round trip, greedy generation, parameter counts): what the
configs turn into, the per-layer KV cache of alternating windows and RoPE bases, the Pallas
kernel with soft-capping and q/k norms, and the one-line errors for options jaxlm does not
implement."""

import functools
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx

import jaxlm
from conftest import assert_hf_config_refused, fixture, pallas_vs_xla
from jaxlm import ConfigError
from jaxlm.hf import family_of, read_hf_config
from jaxlm.models import auto


@nnx.jit
def _logits(model, ids, mask=None, position_ids=None):
  return model(ids, mask, position_ids=position_ids).logits


def logits(model, ids, mask=None, position_ids=None):
  """Jitted: one compile costs less than eager dispatch of every op."""
  return np.asarray(_logits(model, ids, mask, position_ids))


@pytest.fixture(scope="module")
def loaded():
  return {name: jaxlm.from_pretrained(fixture(name)) for name in ("gemma2", "gemma3")}


@pytest.fixture(scope="module")
def gemma2(loaded):
  return loaded["gemma2"]


def gemma_config(name, edit=lambda c: c):
  raw = read_hf_config(fixture(name))
  return family_of(raw["architectures"][0], "test").config_from_hf(edit(raw))


def test_configs_say_what_transformers_does():
  g = gemma_config("gemma")
  assert (g.norm_scale_offset, g.scale_embeddings, g.sandwich_norm) == (1.0, True, False)
  assert g.hidden_act == "gelu_pytorch_tanh"  # config.json's legacy "gelu" means the tanh GELU
  assert (g.head_size, g.hidden_size // g.num_attention_heads, g.kv_heads) == (16, 8, 1)
  assert g.layer_windows() == [None, None] and g.tie_word_embeddings
  assert gemma_config("gemma", lambda c: {**c, "hidden_act": "gelu"}).hidden_act == (
      "gelu_pytorch_tanh")
  g2 = gemma_config("gemma2")
  assert g2.sandwich_norm and g2.layer_windows() == [4, None, 4]
  assert (g2.query_pre_attn_scalar, g2.attn_logit_softcapping,
          g2.final_logit_softcapping) == (24, 2.0, 5.0)
  # Without layer_types, Gemma2Config alternates from a sliding layer 0.
  drop = gemma_config("gemma2_b", lambda c: {k: v for k, v in c.items() if k != "layer_types"})
  assert drop.layer_windows() == [6, None, 6]
  b = gemma_config("gemma2_b")
  assert b.layer_windows() == [None, 6, None] and b.attn_logit_softcapping is None


def test_gemma3_configs_say_what_transformers_does():
  g = gemma_config("gemma3")
  assert (g.model_type, g.qk_norm, g.norm_scale_offset, g.sandwich_norm) == (
      "gemma3_text", "rmsnorm", 1.0, True)
  assert g.layer_windows() == [4, 4, None]  # sliding_window_pattern=3: every 3rd layer global
  assert (g.rope_theta, g.rope_local_base_freq, g.rope_scaling) == (1e6, 10.0, None)
  assert (g.query_pre_attn_scalar, g.attn_logit_softcapping, g.final_logit_softcapping) == (
      24, None, None)
  b = gemma_config("gemma3_b")
  assert b.layer_windows() == [None, 6, 6, None] and b.final_logit_softcapping == 8.0
  assert b.rope_scaling == {"rope_type": "linear", "factor": 4.0}
  assert (b.rope_local_base_freq, b.attention_bias, b.tie_word_embeddings) == (1e4, True, False)
  # Without layer_types or sliding_window_pattern: every 6th layer global (Gemma3TextConfig).
  drop = gemma_config("gemma3_b", lambda c: {k: v for k, v in c.items() if k != "layer_types"})
  assert drop.layer_windows() == [6] * 4
  six = gemma_config("gemma3_b", lambda c: {**{k: v for k, v in c.items() if k != "layer_types"},
                                            "num_hidden_layers": 7})
  assert six.layer_windows() == [6] * 5 + [None, 6]
  # The Hub's legacy keys without any rope_parameters: transformers' defaults per type.
  bare = gemma_config("gemma3", lambda c: {k: v for k, v in c.items()
                                           if k != "rope_parameters"})
  assert (bare.rope_theta, bare.rope_local_base_freq) == (1e6, 1e4)


def test_gemma3_layers_rotate_with_their_types_base():
  """The decoder's per-layer RoPE (base.rope_spec): sliding layers at the local base,
  unscaled; global layers at rope_theta with its scaling; attention keeps the same spec."""
  model = auto.build_abstract_model(gemma_config("gemma3_b").replace(
      architectures=["Gemma3ForCausalLM"]))
  specs = model.model.ropes
  assert [s.theta for s in specs] == [1e6, 1e4, 1e4, 1e6]
  assert [dict(s.scaling) for s in specs] == [{"rope_type": "linear", "factor": 4.0}, {}, {},
                                              {"rope_type": "linear", "factor": 4.0}]
  assert [layer.attn.rope for layer in model.model.layers] == list(specs)


@pytest.mark.parametrize("edit,needle", [
    (lambda c: {**c, "attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
    (lambda c: {**c, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
     "rope_parameters of gemma3_text must be a dict per layer type"),
    (lambda c: {**c, "rope_parameters": {**c["rope_parameters"], "sliding_attention": {
        "rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     "rope_parameters.sliding_attention"),
    (lambda c: {**c, "rope_parameters": {**c["rope_parameters"], "full_attention": {
        "rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}}, "rope type 'yarn'"),
    (lambda c: {**{k: v for k, v in c.items() if k != "rope_parameters"},
                "rope_scaling": {"type": "linear", "factor": 8.0}}, "rope_scaling="),
    (lambda c: {**{k: v for k, v in c.items() if k != "layer_types"},
                "sliding_window_pattern": 0}, "sliding_window_pattern"),
    (lambda c: {**c, "use_bidirectional_attention": True}, "use_bidirectional_attention"),
], ids=["attn-softcap", "flat-rope", "local-scaling", "yarn", "legacy-type-key", "pattern-0",
        "bidirectional"])
def test_gemma3_unsupported_options_are_one_line_errors(tmp_path, edit, needle):
  assert_hf_config_refused(tmp_path, "gemma3_b", edit, re.escape(needle))


def test_gemma3_without_a_local_base_rotates_every_layer_alike():
  """rope_local_base_freq=None: the sliding layers take rope_theta and its scaling too, which
  Gemma 3's rope_parameters spell as two equal dicts (and read back as None)."""
  fam = family_of("Gemma3ForCausalLM", "test")
  cfg = gemma_config("gemma3_b").replace(rope_local_base_freq=None)
  params = fam.config_to_hf(cfg, "Gemma3ForCausalLM")["rope_parameters"]
  assert params["sliding_attention"] == params["full_attention"] == {
      "rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}
  assert fam.config_from_hf(fam.config_to_hf(cfg, "Gemma3ForCausalLM")) == cfg
  model = auto.build_abstract_model(cfg.replace(architectures=["Gemma3ForCausalLM"]))
  assert len(set(model.model.ropes)) == 1


@pytest.mark.parametrize("edit,needle", [
    (lambda c: {**c, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
     "rope type 'yarn'"),
    (lambda c: {**c, "rope_local_base_freq": 10000.0}, "rope_local_base_freq"),
    (lambda c: {**c, "sliding_window_pattern": 6}, "sliding_window_pattern"),
    (lambda c: {**c, "rope_parameters": {"full_attention": {"rope_type": "default"},
                                         "sliding_attention": {"rope_type": "default"}}},
     "rope_parameters per layer type"),
    (lambda c: {**c, "use_bidirectional_attention": True}, "use_bidirectional_attention"),
    (lambda c: {**c, "layer_types": ["sliding_attention", "chunked_attention",
                                     "full_attention"]}, "layer_types"),
    (lambda c: {**c, "rope_parameters": {**c["rope_parameters"], "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
], ids=["rope-type", "gemma3-local-base", "gemma3-pattern", "gemma3-rope-per-type",
        "bidirectional", "layer-types", "partial-rotary"])
def test_unsupported_options_are_one_line_errors_naming_the_key(tmp_path, edit, needle):
  assert_hf_config_refused(tmp_path, "gemma2", edit, needle)


@pytest.mark.parametrize("name,sizes", [("gemma2", [4, 20, 4]), ("gemma3", [4, 4, 20])])
def test_alternating_windows_size_each_layers_cache(loaded, name, sizes):
  """Windowed layers keep `window` slots (a ring buffer that wraps many times here), the
  global layer the full length; every cached step equals the full forward pass (Gemma 3:
  each layer rotating with its own RoPE base)."""
  model = loaded[name]
  rng = np.random.default_rng(0)
  lengths, P = [20, 13, 16], 20
  ids = np.zeros((3, P), np.int64)
  mask = np.zeros((3, P), np.int64)
  for b, n in enumerate(lengths):  # left-padded
    ids[b, P - n:], mask[b, P - n:] = rng.integers(5, 256, n), 1
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  full = logits(model, ids, mask, pos)
  tol = 2e-6 * max(1.0, float(np.abs(full).max()))  # fp32 rounding of logits up to ~8
  cache = model.init_cache(3, P)
  assert [c["self"].size for c in cache] == sizes
  graphdef, params = nnx.split(model)
  call = functools.partial(jax.jit(lambda p, *a, cache: nnx.merge(graphdef, p)(
      a[0], a[1], position_ids=a[2], cache=cache)), params)
  out = call(ids[:, :6], mask[:, :6], pos[:, :6], cache=cache)
  real = mask[:, :6, None] > 0
  np.testing.assert_allclose(np.where(real, out.logits, 0), np.where(real, full[:, :6], 0),
                             atol=tol)
  for t in range(6, P):
    out = call(ids[:, t:t + 1], mask[:, t:t + 1], pos[:, t:t + 1], cache=out.cache)
    real = mask[:, t, None] > 0
    np.testing.assert_allclose(np.where(real, out.logits[:, 0], 0),
                               np.where(real, full[:, t], 0), atol=tol, err_msg=f"step {t}")


# Gemma 3's gradients: its unscaled (1 + w) q/k norms make sharp softmaxes, and the
# kernel's blockwise softmax sums in another order; the worst element is 5.9e-5 of an
# embedding gradient whose leaf reaches 38 (1.8e-6 of it), while logits stay within 2e-5.
@pytest.mark.parametrize("name,grad_tol", [
    ("gemma2", 2e-5), pytest.param("gemma3", 1e-4, marks=pytest.mark.slow)])
def test_pallas_matches_xla_with_soft_caps_and_alternating_windows(loaded, name, grad_tol):
  """attention_impl="pallas" (interpret mode on CPU): logits equal the XLA reference within
  2e-5 and every gradient within `grad_tol` (relative to max(1, |x|)) and 2e-5 of its
  leaf's largest entry, soft caps and windows included (Gemma 2), q/k norms before the
  kernel and RoPE per layer type (Gemma 3)."""
  model = loaded[name]
  logits_err, grads_err, live, leaf_err = pallas_vs_xla(model.config,
                                                        nnx.state(model, nnx.Param), name)
  assert logits_err <= 2e-5 and grads_err <= grad_tol and leaf_err <= 2e-5
  assert live  # every grad is live


def test_options_another_family_cannot_express_fall_back_to_a_jaxlm_export(tmp_path):
  llama = jaxlm.from_pretrained(fixture("llama"))
  for field, value in (("attn_logit_softcapping", 5.0), ("sandwich_norm", True),
                       ("layer_types", ["full_attention", "sliding_attention"])):
    cfg = llama.config.replace(**{field: value}, sliding_window=4)
    with pytest.raises(ConfigError, match=f"model.{field}="):
      family_of("LlamaForCausalLM", "test").config_to_hf(cfg, "MistralForCausalLM")
  model = auto.build_model(llama.config.replace(attn_logit_softcapping=5.0,
                                                final_logit_softcapping=3.0), seed=0)
  assert jaxlm.save_pretrained(model, str(tmp_path)) == "jaxlm"
  again = jaxlm.from_pretrained(str(tmp_path))
  ids = np.arange(3, 15)[None]
  want = logits(model, ids)
  np.testing.assert_array_equal(logits(again, ids), want)
  assert float(np.abs(want).max()) < 3.0  # capped


def test_quantized_gemma2_keeps_the_embedding_scale_and_final_cap():
  """quantize swaps the tied table for a QuantEmbed (in place): its lookups are still
  scaled by sqrt(D), and the head it serves still soft-caps."""
  from jaxlm.compress.quantize import QuantEmbed
  model = jaxlm.from_pretrained(fixture("gemma2"))
  ids = np.load(os.path.join(fixture("gemma2"), "inputs.npz"))["input_ids"][:1]
  want = logits(model, ids)
  jaxlm.quantize(model, "int8")
  assert isinstance(model.model.embed, QuantEmbed) and model.model.embed.scale == 32 ** 0.5
  got = logits(model, ids)
  assert np.abs(got).max() < model.config.final_logit_softcapping
  assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
