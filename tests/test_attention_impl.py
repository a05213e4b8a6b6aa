"""model.attention_impl: every model family gives the same logits and gradients with our
Pallas flash-attention kernel (interpret mode on CPU) as with the XLA reference, on the
Hugging Face fixtures (right-padded rows) and on packed rows; and the switch's errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlm
from conftest import FIXTURES
from jaxlm import ConfigError, Runtime
from jaxlm.layers.attention import resolve_impl
from jaxlm.models import auto

# Every attention variant of the zoo: learned positions (gpt2), GQA + RoPE (llama),
# sliding window (mistral), ALiBi (bloom, mpt), partial rotary + parallel residual
# (gpt_neox), MoE (mixtral), bidirectional encoders with padding (bert, distilbert).
FAMILIES = ("gpt2", "llama", "mistral", "bloom", "mpt", "gpt_neox", "mixtral", "bert_mlm",
            "distilbert_mlm")


def with_impl(model, impl):
  other = auto.build_abstract_model(model.config, runtime=Runtime(attention_impl=impl))
  nnx.update(other, nnx.state(model, nnx.Param))
  return other


def logits_and_grads(model, ids, mask, real, segment_ids=None):
  """Logits, and d(sum of real-position logits * fixed weights)/d(params)."""
  graphdef, params = nnx.split(model, nnx.Param)
  kw = {} if segment_ids is None else {"segment_ids": segment_ids}
  w = jax.random.normal(jax.random.key(0), (model.config.vocab_size,))

  @jax.jit
  def run(params):
    def f(p):
      logits = nnx.merge(graphdef, p)(ids, mask, **kw).logits
      return (logits * real[..., None] * w).sum() / real.sum(), logits
    return jax.value_and_grad(f, has_aux=True)(params)

  (_, logits), grads = run(params)
  return np.asarray(logits), jax.tree.leaves(grads)


def close(got, want, tol=2e-5):
  err = np.max(np.abs(got - want) / np.maximum(1.0, np.abs(want)))
  assert err <= tol, err


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_pallas_matches_xla_on_every_family(family):
  model = jaxlm.from_pretrained(os.path.join(FIXTURES, family))
  inputs = dict(np.load(os.path.join(FIXTURES, family, "inputs.npz")))
  ids = jnp.asarray(inputs["input_ids"], jnp.int32)
  mask = jnp.asarray(inputs["attention_mask"], jnp.int32)
  real = mask.astype(jnp.float32)
  want, want_g = logits_and_grads(with_impl(model, "xla"), ids, mask, real)
  got, got_g = logits_and_grads(with_impl(model, "pallas"), ids, mask, real)
  on = np.asarray(mask, bool)
  close(got[on], want[on])  # padded queries differ by design (the kernel outputs 0)
  for a, b in zip(want_g, got_g):
    close(np.asarray(b), np.asarray(a))


@pytest.mark.slow
def test_pallas_matches_xla_on_packed_rows():
  model = jaxlm.from_pretrained(os.path.join(FIXTURES, "mistral"))  # window 4 + packing
  seg = jnp.asarray([[1] * 5 + [2] * 4 + [3] * 3, [1] * 7 + [2] * 3 + [0] * 2], jnp.int32)
  ids = jnp.asarray(np.random.default_rng(0).integers(3, 256, seg.shape), jnp.int32)
  real = (seg > 0).astype(jnp.float32)
  want, want_g = logits_and_grads(with_impl(model, "xla"), ids, None, real, seg)
  got, got_g = logits_and_grads(with_impl(model, "pallas"), ids, None, real, seg)
  on = np.asarray(seg > 0)
  close(got[on], want[on])
  for a, b in zip(want_g, got_g):
    close(np.asarray(b), np.asarray(a))


def test_impl_switch_errors_and_auto():
  assert resolve_impl("auto") == "xla"  # CPU: the reference (Pallas would interpret)
  # On a GPU, auto never lowers an fp32 model's attention precision; half models get cuDNN.
  assert resolve_impl("auto", dtype=jnp.float32, platform="gpu") == "xla"
  assert resolve_impl("auto", dtype=jnp.bfloat16, platform="gpu") == "cudnn"
  assert resolve_impl("auto", dtype=jnp.float16, platform="gpu") == "cudnn"
  assert resolve_impl("auto", dtype=jnp.bfloat16, platform="tpu") == "pallas"
  assert resolve_impl("auto", dense_bias=True, platform="tpu") == "xla"
  assert resolve_impl("cudnn", dtype=jnp.bfloat16, platform="gpu") == "cudnn"
  with pytest.raises(ConfigError, match=r"'cudnn' runs attention in bf16/fp16, but the model "
                                        r"computes in float32"):
    resolve_impl("cudnn", dtype=jnp.float32, platform="gpu")
  with pytest.raises(ConfigError, match=r"attention_impl='cudnn' needs an NVIDIA GPU"):
    resolve_impl("cudnn")
  cfg = jaxlm.from_pretrained(os.path.join(FIXTURES, "t5")).config
  with pytest.raises(ConfigError, match="relative positions"):
    auto.build_abstract_model(cfg, runtime=Runtime(attention_impl="pallas"))
  auto.build_abstract_model(cfg, runtime=Runtime(attention_impl="auto"))  # falls back to xla
  with pytest.raises(ConfigError, match="model.attention_impl must be one of"):
    Runtime(attention_impl="flash")
  # cuDNN has no logit soft-capping (Gemma 2): auto takes our kernel, an explicit choice fails.
  assert resolve_impl("auto", softcap=True, dtype=jnp.bfloat16, platform="gpu") == "pallas"
  assert resolve_impl("auto", softcap=True, dtype=jnp.float32, platform="gpu") == "xla"
  with pytest.raises(ConfigError, match="attn_logit_softcapping"):
    resolve_impl("cudnn", softcap=True, dtype=jnp.bfloat16, platform="gpu")
