"""Gemma and Gemma 2 beyond the parity checks every decoder gets in test_hf_decoders.py
(logits, round trip, greedy generation, parameter counts): what the configs turn into,
the per-layer KV cache of alternating windows, the Pallas kernel with soft-capping, and
the one-line errors for options jaxlm does not implement."""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlm
from conftest import fixture
from jaxlm import ConfigError
from jaxlm.hf import family_of, read_hf_config
from jaxlm.models import auto
from test_hf_decoders import pallas_and_xla, rel_err


@nnx.jit
def _logits(model, ids, mask=None, position_ids=None):
  return model(ids, mask, position_ids=position_ids).logits


def logits(model, ids, mask=None, position_ids=None):
  """Jitted: one compile costs less than eager dispatch of every op."""
  return np.asarray(_logits(model, ids, mask, position_ids))


@pytest.fixture(scope="module")
def gemma2():
  return jaxlm.from_pretrained(fixture("gemma2"))


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
  with pytest.raises(ConfigError, match=needle) as e:
    gemma_config("gemma2", edit)
  assert "\n" not in str(e.value)
  d = tmp_path / "gemma2"
  shutil.copytree(fixture("gemma2"), d)
  (d / "config.json").write_text(json.dumps(edit(read_hf_config(str(d)))))
  with pytest.raises(ConfigError, match=needle):
    jaxlm.from_pretrained(str(d))


def test_alternating_windows_size_each_layers_cache(gemma2):
  """Windowed layers keep `window` slots (a ring buffer that wraps many times here), the
  global layer the full length; every cached step equals the full forward pass."""
  model = gemma2
  rng = np.random.default_rng(0)
  lengths, P = [20, 13, 16], 20
  ids = np.zeros((3, P), np.int64)
  mask = np.zeros((3, P), np.int64)
  for b, n in enumerate(lengths):  # left-padded
    ids[b, P - n:], mask[b, P - n:] = rng.integers(5, 256, n), 1
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  full = logits(model, ids, mask, pos)
  cache = model.init_cache(3, P)
  assert [c["self"].size for c in cache] == [4, P, 4]
  graphdef, params = nnx.split(model)
  call = functools.partial(jax.jit(lambda p, *a, cache: nnx.merge(graphdef, p)(
      a[0], a[1], position_ids=a[2], cache=cache)), params)
  out = call(ids[:, :6], mask[:, :6], pos[:, :6], cache=cache)
  real = mask[:, :6, None] > 0
  np.testing.assert_allclose(np.where(real, out.logits, 0), np.where(real, full[:, :6], 0),
                             atol=1e-5)
  for t in range(6, P):
    out = call(ids[:, t:t + 1], mask[:, t:t + 1], pos[:, t:t + 1], cache=out.cache)
    real = mask[:, t, None] > 0
    np.testing.assert_allclose(np.where(real, out.logits[:, 0], 0),
                               np.where(real, full[:, t], 0), atol=1e-5, err_msg=f"step {t}")


def test_pallas_matches_xla_with_soft_caps_and_alternating_windows(gemma2):
  """attention_impl="pallas" (interpret mode on CPU): logits and every gradient equal the
  XLA reference within 2e-5 (relative to max(1, |x|)), soft caps and windows included."""
  inputs = dict(np.load(os.path.join(fixture("gemma2"), "inputs.npz")))
  ids = jnp.asarray(inputs["input_ids"], jnp.int32)
  mask = jnp.asarray(inputs["attention_mask"], jnp.int32)
  runs = pallas_and_xla(gemma2, ids, mask)
  (want, want_g), (got, got_g) = runs["xla"], runs["pallas"]
  on = np.asarray(mask, bool)
  assert rel_err(got[on], want[on]) <= 2e-5
  assert max(rel_err(a, b) for a, b in zip(got_g, want_g)) <= 2e-5
  assert sum(float(np.abs(g).sum()) > 0 for g in want_g) == len(want_g)  # every grad is live


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
