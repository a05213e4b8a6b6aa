import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import dot_operand_types
from jaxlm import ModelConfig, Runtime, build_model
from jaxlm.layers.attention import causal_mask, dot_product_attention, padding_mask
from jaxlm.layers.position import apply_rope

CFG = ModelConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=32)


def reference_attention(q, k, v, mask):
  """Plain MHA with K/V repeated per query head."""
  N, K = q.shape[2], k.shape[2]
  k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  logits = jnp.where(mask, logits, -1e30)
  return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, -1), v)


def test_grouped_attention_matches_repeated_kv():
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (2, 5, 8, 16))
  k = jax.random.normal(kk, (2, 5, 2, 16))
  v = jax.random.normal(kv, (2, 5, 2, 16))
  mask = causal_mask(5, 5) & padding_mask(jnp.array([[1] * 5, [1, 1, 1, 0, 0]]))
  np.testing.assert_allclose(dot_product_attention(q, k, v, mask),
                             reference_attention(q, k, v, mask), atol=1e-5)


def test_rmsnorm_scale_offset_and_embedding_scale():
  """Gemma's pieces: x / rms(x) * (1 + w) in float32, starting at the identity scale; and
  embeddings times sqrt(D) with the constant rounded to the compute dtype first."""
  from jaxlm.layers.embed import Embed
  from jaxlm.layers.norm import RMSNorm
  x = jax.random.normal(jax.random.key(0), (2, 3, 8)).astype(jnp.bfloat16)
  plain, gemma = RMSNorm(8), RMSNorm(8, scale_offset=1.0)
  np.testing.assert_array_equal(gemma(x), plain(x))  # init: w = 0, so (1 + w) = 1
  gemma.scale[...] = jnp.full((8,), 0.5)
  assert gemma(x).dtype == jnp.float32
  np.testing.assert_allclose(gemma(x), 1.5 * plain(x), rtol=1e-6)
  emb = Embed(10, 3072, scale=3072 ** 0.5, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  table = emb.embedding[...]
  np.testing.assert_array_equal(emb(jnp.array([1])), table[1:2] * 55.5)  # bf16(55.43)
  emb.dtype = jnp.float32
  np.testing.assert_allclose(emb(jnp.array([1])), table[1:2] * 3072 ** 0.5, rtol=1e-6)


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_qk_norm_normalizes_each_head_before_attention(kind):
  """model.qk_norm: Qwen3/Gemma 3 norm each head's q and k with one [H] scale (RMSNorm),
  Cohere with a bias-free LayerNorm holding a scale per head [N, H]; both before RoPE."""
  from jaxlm.analysis import closed_form_params
  from jaxlm.models import block
  cfg = ModelConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=64, causal=True,
                    norm_type="rmsnorm", norm_position="pre", qk_norm=kind,
                    attention_bias=False, layer_norm_eps=1e-6, attention_probs_dropout_prob=0.0,
                    position_embedding_type="rope")
  attn = block.attention(cfg, Runtime(), rngs=nnx.Rngs(0))
  N, K, H = 4, 2, 8
  shape = {"rmsnorm": ((H,), (H,)), "layernorm": ((N, H), (K, H))}[kind]
  assert (attn.q_norm.scale.shape, attn.k_norm.scale.shape) == shape
  rs = np.random.RandomState(0)
  attn.q_norm.scale[...] = jnp.asarray(rs.normal(1, 0.3, shape[0]), jnp.float32)
  attn.k_norm.scale[...] = jnp.asarray(rs.normal(1, 0.3, shape[1]), jnp.float32)
  x = jax.random.normal(jax.random.key(1), (2, 5, 32))
  pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
  _, got = attn(x, mask=causal_mask(5, 5), position_ids=pos)

  def norm(y, w):  # by hand, in NumPy
    y = np.asarray(y, np.float64)
    if kind == "layernorm":
      y = y - y.mean(-1, keepdims=True)
    return y / np.sqrt(np.square(y).mean(-1, keepdims=True) + 1e-6) * np.asarray(w)

  q = norm(attn.q(x).reshape(2, 5, N, H), attn.q_norm.scale[...])
  k = norm(attn.k(x).reshape(2, 5, K, H), attn.k_norm.scale[...])
  cos, sin = attn.rope(pos)
  q, k = (apply_rope(jnp.asarray(y, jnp.float32), cos, sin) for y in (q, k))
  out = reference_attention(q, k, attn.v(x).reshape(2, 5, K, H), causal_mask(5, 5))
  np.testing.assert_allclose(got, attn.o(out.reshape(2, 5, N * H)), atol=2e-5)
  lm = cfg.replace(architectures=["LlamaForCausalLM"])
  n = sum(p.size for p in jax.tree.leaves(nnx.state(build_model(lm), nnx.Param)))
  assert closed_form_params(lm)["total"] == n


def test_sliding_window_mask():
  m = np.asarray(causal_mask(6, 6, window=3))[0, 0]
  i, j = np.nonzero(m)
  assert ((i - j >= 0) & (i - j < 3)).all() and m.sum() == 1 + 2 + 3 * 4


def test_padding_does_not_change_real_tokens():
  model = build_model(CFG.replace(architectures=["BertForPreTraining"]))
  ids = jnp.array([[2, 10, 11, 12, 3, 0, 0, 0]])
  mask = jnp.array([[1, 1, 1, 1, 1, 0, 0, 0]])
  ids_pad = ids.at[0, 5:].set(jnp.array([40, 41, 42]))  # garbage in padded slots
  a = model(ids, mask).last_hidden_state[:, :5]
  b = model(ids_pad, mask).last_hidden_state[:, :5]
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_masked_positions_gather_equals_full_logits():
  model = build_model(CFG)
  ids = jax.random.randint(jax.random.key(1), (2, 12), 5, 97)
  pos = jnp.array([[1, 4, 7], [0, 2, 11]])
  full = model(ids).logits
  gathered = model(ids, masked_positions=pos).logits
  np.testing.assert_allclose(gathered, jnp.take_along_axis(full, pos[..., None], 1), atol=1e-5)
  assert full.shape == (2, 12, 97)


def test_bf16_compute_close_to_f32():
  m32 = build_model(CFG)
  m16 = build_model(CFG, runtime=Runtime(dtype="bfloat16"))
  ids = jax.random.randint(jax.random.key(2), (2, 12), 5, 97)
  a, b = m32(ids).logits, m16(ids).logits
  assert nnx.state(m16, nnx.Param)["bert"]["pooler"]["kernel"][...].dtype == jnp.float32
  assert jnp.abs(a - b).max() < 0.05 * jnp.abs(a).max()
  # bf16 really reached the matmuls: bf16 dots in the program, and more than f32 rounding
  # apart (an ignored runtime dtype would give identical logits).
  assert jnp.abs(a - b).max() > 1e-4 * jnp.abs(a).max()
  types = {d: dot_operand_types(lambda x, m=m: m(x).logits, ids) for d, m in (("32", m32),
                                                                               ("16", m16))}
  assert set(types["32"]) == {"f32"} and types["16"].count("bf16") >= 6, types


def test_dropout_is_seeded():
  model = build_model(CFG)
  ids = jax.random.randint(jax.random.key(3), (2, 12), 5, 97)
  a = model(ids, rngs=nnx.Rngs(dropout=0)).logits
  b = model(ids, rngs=nnx.Rngs(dropout=0)).logits
  c = model(ids, rngs=nnx.Rngs(dropout=1)).logits
  d = model(ids).logits
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c) and not np.allclose(a, d)


def test_bf16_matmul_gradients_close_to_f32():
  from jaxlm.layers.linear import matmul
  kx, kw = jax.random.split(jax.random.key(4))
  x = jax.random.normal(kx, (3, 5, 16))
  w = jax.random.normal(kw, (16, 8))
  f = lambda dtype: lambda x, w: (jnp.sin(matmul(x, w, dtype))).sum()
  g32 = jax.grad(f(jnp.float32), argnums=(0, 1))(x, w)
  g16 = jax.grad(f(jnp.bfloat16), argnums=(0, 1))(x, w)
  for a, b in zip(g32, g16):
    assert a.shape == b.shape and a.dtype == b.dtype == jnp.float32
    assert 1e-4 * jnp.abs(a).max() < jnp.abs(a - b).max() < 0.05 * jnp.abs(a).max()
  # Forward and both backward matmuls in bf16 (the custom VJP casts the cotangent).
  grad16 = jax.grad(f(jnp.bfloat16), argnums=(0, 1))
  assert dot_operand_types(grad16, x, w).count("bf16") == 3


@pytest.mark.parametrize("transpose_w", [False, True])
def test_matmul_vjp_equals_autodiff_in_f32(transpose_w):
  """The custom VJP (materialized transposes, 2-D weight gradient) is exact in f32."""
  from jaxlm.layers.linear import matmul
  kx, kw = jax.random.split(jax.random.key(5))
  x = jax.random.normal(kx, (3, 5, 16))
  w = jax.random.normal(kw, (8, 16) if transpose_w else (16, 8))
  ours = lambda x, w: jnp.sin(matmul(x, w, jnp.float32, transpose_w=transpose_w)).sum()
  plain = lambda x, w: jnp.sin(x @ (w.T if transpose_w else w)).sum()
  np.testing.assert_allclose(ours(x, w), plain(x, w), rtol=1e-6)
  for a, b in zip(jax.jit(jax.grad(ours, (0, 1)))(x, w), jax.grad(plain, (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_materialize_is_identity_with_gradient():
  from jaxlm.layers.linear import materialize
  x = jnp.arange(12.0).reshape(3, 4)
  np.testing.assert_array_equal(jax.jit(lambda x: materialize(x.T))(x), x.T)
  np.testing.assert_array_equal(jax.grad(lambda x: (materialize(x) ** 2).sum())(x), 2 * x)
  assert materialize(jnp.zeros((0, 3))).shape == (0, 3)
