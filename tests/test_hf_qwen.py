"""Qwen2's mixed attention patterns and Qwen3 beyond the parity checks every decoder gets
in test_hf_decoders.py (logits, round trip, greedy generation, parameter counts): what the
configs turn into, the q/k norm's tensors, Pallas on sliding and full layers, and the
one-line errors for options jaxlm does not implement or a class cannot express."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlm
from conftest import assert_hf_config_refused, fixture
from jaxlm import ConfigError, Runtime
from jaxlm.hf import family_of, read_hf_config
from jaxlm.models import auto


def qwen_config(name, edit=lambda c: c):
  raw = read_hf_config(fixture(name))
  return family_of(raw["architectures"][0], "test").config_from_hf(edit(raw))


def without(c, *keys, **extra):
  return {**{k: v for k, v in c.items() if k not in keys}, **extra}


def test_qwen3_configs_say_what_transformers_does():
  q = qwen_config("qwen3")
  assert (q.model_type, q.qk_norm, q.norm_scale_offset) == ("qwen3", "rmsnorm", 0.0)
  assert (q.head_size, q.hidden_size // q.num_attention_heads, q.kv_heads) == (16, 8, 2)
  assert (q.attention_bias, q.attention_out_bias, q.mlp_bias) == (False, False, False)
  assert q.layer_windows() == [None, None] and q.tie_word_embeddings and q.rope_theta == 1e6
  b = qwen_config("qwen3_b")
  assert (b.attention_bias, b.attention_out_bias) == (True, True)  # q, k, v and o alike
  assert b.layer_windows() == [4, None, 4] and not b.tie_word_embeddings
  # Qwen3Config's head_dim defaults to 128 whatever hidden_size / heads is.
  assert qwen_config("qwen3", lambda c: without(c, "head_dim")).head_size == 128
  # Without layer_types: sliding from layer max_window_layers on (as Qwen2).
  assert qwen_config("qwen3_b", lambda c: without(
      c, "layer_types", max_window_layers=2)).layer_windows() == [None, None, 4]
  m = qwen_config("qwen2_mixed")
  assert m.layer_windows() == [None, 4, 4] and m.qk_norm is None
  assert qwen_config("qwen2_mixed", lambda c: without(c, "layer_types")) == m


def test_qwen3_norms_each_heads_queries_and_keys_with_one_shared_scale():
  model = jaxlm.from_pretrained(fixture("qwen3"))
  attn = model.model.layers[1].attn
  assert attn.q_norm.scale.shape == attn.k_norm.scale.shape == (16,)  # [head_dim]
  from safetensors.numpy import load_file
  hf = load_file(os.path.join(fixture("qwen3"), "model.safetensors"))
  np.testing.assert_array_equal(np.asarray(attn.k_norm.scale[...]),
                                hf["model.layers.1.self_attn.k_norm.weight"])


@pytest.mark.parametrize("edit,needle", [
    (lambda c: {**c, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
     "rope type 'yarn'"),
    (lambda c: {**c, "rope_parameters": {**c["rope_parameters"], "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    (lambda c: {**c, "use_sliding_window": False}, "no window"),
    (lambda c: {**c, "layer_types": ["sliding_attention", "chunked_attention",
                                     "full_attention"]}, "layer_types"),
], ids=["rope-type", "partial-rotary", "sliding-without-window", "layer-types"])
def test_unsupported_options_are_one_line_errors_naming_the_key(tmp_path, edit, needle):
  assert_hf_config_refused(tmp_path, "qwen3_b", edit, needle)


def test_what_a_qwen_class_cannot_express_is_refused_on_export():
  qwen3 = qwen_config("qwen3_b")
  to_hf = family_of("Qwen3ForCausalLM", "test").config_to_hf
  for field, value in (("qk_norm", "layernorm"), ("qk_norm", None),
                       ("attention_out_bias", False), ("norm_scale_offset", 1.0)):
    with pytest.raises(ConfigError, match=f"model.{field}="):
      to_hf(qwen3.replace(**{field: value}), "Qwen3ForCausalLM")
  with pytest.raises(ConfigError, match="model.qk_norm="):  # Qwen2 has no q/k norm
    to_hf(qwen3.replace(attention_out_bias=False), "Qwen2ForCausalLM")
  mixed = to_hf(qwen_config("qwen2_mixed"), "Qwen2ForCausalLM")
  assert (mixed["use_sliding_window"], mixed["sliding_window"], mixed["layer_types"]) == (
      True, 4, ["full_attention", "sliding_attention", "sliding_attention"])
  # A window no layer uses is no sliding attention at all.
  unused = to_hf(qwen3.replace(layer_types=["full_attention"] * 3), "Qwen3ForCausalLM")
  assert (unused["use_sliding_window"], unused["sliding_window"]) == (False, None)


@nnx.jit
def _logits(model, ids, mask):
  return model(ids, mask).logits


def test_pallas_matches_xla_with_qk_norm_and_mixed_windows():
  """attention_impl="pallas" (interpret mode on CPU): the q/k norms run before the kernel,
  which sees each layer's own window."""
  src = jaxlm.from_pretrained(fixture("qwen3_b"))
  x = dict(np.load(os.path.join(fixture("qwen3_b"), "inputs.npz")))
  ids, mask = jnp.asarray(x["input_ids"], jnp.int32), jnp.asarray(x["attention_mask"], jnp.int32)
  model = auto.build_abstract_model(src.config, runtime=Runtime(attention_impl="pallas"))
  nnx.update(model, nnx.state(src, nnx.Param))
  want, got = np.asarray(_logits(src, ids, mask)), np.asarray(_logits(model, ids, mask))
  on = x["attention_mask"].astype(bool)
  assert np.abs(got - want)[on].max() <= 2e-5 * max(1.0, np.abs(want).max())
