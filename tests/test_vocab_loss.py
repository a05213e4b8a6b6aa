"""The fused vocabulary projection + cross-entropy against plain logits and autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import dot_operand_types
from jaxlm.layers import vocab_loss
from jaxlm.layers.vocab_loss import Projection, cross_entropy_sums


def _reference(h, w, bias, vocab_major, targets, weights):
  logits = h @ (w.T if vocab_major else w)
  if bias is not None:
    logits = logits + bias
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  hits = (logits.argmax(-1) == targets) * weights
  return (nll * weights).sum(), hits.sum()


def _inputs(B=3, T=10, D=16, V=40, vocab_major=True, seed=0):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(V, D) if vocab_major else (D, V)) * 0.3, jnp.float32)
  bias = jnp.asarray(rng.normal(size=(V,)) * 0.1, jnp.float32)
  logits = h @ (w.T if vocab_major else w)
  # Half the targets are the top logit, so that hits are counted too.
  targets = jnp.where(jnp.asarray(rng.random((B, T)) < 0.5), logits.argmax(-1),
                      jnp.asarray(rng.integers(0, V, (B, T)))).astype(jnp.int32)
  weights = jnp.asarray(rng.random((B, T)) > 0.2, jnp.float32)
  return h, w, bias, targets, weights


@pytest.mark.parametrize("vocab_major", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("chunk_logits", [1 << 22, 64])  # one chunk; 8 chunks of 1-2 positions
def test_matches_autodiff_of_plain_logits(monkeypatch, vocab_major, with_bias, chunk_logits):
  monkeypatch.setattr(vocab_loss, "CHUNK_LOGITS", chunk_logits)
  h, w, bias, targets, weights = _inputs(vocab_major=vocab_major)
  bias = bias if with_bias else None

  def fused(h, w, bias):
    return cross_entropy_sums(Projection(h, w, bias, vocab_major=vocab_major), targets, weights)

  def ref(h, w, bias):
    return _reference(h, w, bias, vocab_major, targets, weights)

  (loss, hits), (loss_r, hits_r) = fused(h, w, bias), ref(h, w, bias)
  np.testing.assert_allclose(loss, loss_r, rtol=1e-5)
  assert float(hits) == float(hits_r) > 0
  argnums = (0, 1, 2) if with_bias else (0, 1)
  g = jax.jit(jax.grad(lambda *a: fused(*a)[0] * 0.7, argnums))(h, w, bias)
  g_r = jax.grad(lambda *a: ref(*a)[0] * 0.7, argnums)(h, w, bias)
  for a, b in zip(g, g_r):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("vocab_major", [True, False])
def test_final_logit_soft_cap_matches_autodiff(vocab_major):
  """Gemma 2's cap * tanh(logits / cap), in the fused loss and its gradient."""
  h, w, bias, targets, weights = _inputs(vocab_major=vocab_major)
  h, cap = 3.0 * h, 2.0  # logits well beyond the cap

  def fused(h, w):
    return cross_entropy_sums(Projection(h, w, bias, vocab_major=vocab_major, softcap=cap),
                              targets, weights)[0]

  def ref(h, w):
    logits = cap * jnp.tanh((h @ (w.T if vocab_major else w) + bias) / cap)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    return (nll * weights).sum()

  proj = Projection(h, w, bias, vocab_major=vocab_major, softcap=cap)
  assert float(jnp.abs(proj.logits()).max()) < cap
  (loss, g), (loss_r, g_r) = (jax.jit(jax.value_and_grad(f, (0, 1)))(h, w) for f in (fused, ref))
  np.testing.assert_allclose(loss, loss_r, rtol=1e-5)
  for a, b in zip(g, g_r):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_bf16_close_to_f32_and_logits_agree():
  h, w, bias, targets, weights = _inputs(D=64, V=300)
  p32 = Projection(h, w, bias)
  p16 = Projection(h, w, bias, dtype=jnp.bfloat16)
  np.testing.assert_allclose(p32.logits(), h @ w.T + bias, rtol=1e-5, atol=1e-5)
  g32 = jax.grad(lambda h, w: cross_entropy_sums(p32.replace(h=h, w=w), targets, weights)[0],
                 (0, 1))(h, w)
  g16 = jax.grad(lambda h, w: cross_entropy_sums(p16.replace(h=h, w=w), targets, weights)[0],
                 (0, 1))(h, w)
  np.testing.assert_allclose(cross_entropy_sums(p16, targets, weights)[0],
                             cross_entropy_sums(p32, targets, weights)[0], rtol=2e-2)
  for a, b in zip(g16, g32):
    assert a.dtype == jnp.float32
    assert 1e-4 < float(jnp.abs(a - b).max() / jnp.abs(b).max()) < 3e-2
  grad16 = jax.grad(lambda h, w: cross_entropy_sums(p16.replace(h=h, w=w), targets, weights)[0],
                    (0, 1))
  assert "bf16" in dot_operand_types(grad16, h, w)
  assert "bf16" not in dot_operand_types(
      lambda h, w: cross_entropy_sums(p32.replace(h=h, w=w), targets, weights)[0], h, w)
