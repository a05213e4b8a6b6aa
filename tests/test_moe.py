"""Sparse mixture of experts: Mixtral parity with transformers (logits and aux loss), the
dispatch against a dense every-expert reference (outputs and gradients), capacity mode,
router statistics, MoE in other families, bf16, HF round trips and named errors."""

import json
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
from jaxlm import ConfigError, DataError, ModelConfig, build_model
from jaxlm.hf import family_of, read_hf_config
from jaxlm.layers.moe import (_ROUTER_STATS, MoE, capacity, pop_router_stats, route,
                              router_losses)
from jaxlm.models.base import router_outputs

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "mixtral")


def fixture_inputs():
  return dict(np.load(os.path.join(FIXTURE, "inputs.npz")))


def expected():
  return dict(np.load(os.path.join(FIXTURE, "expected.npz")))


@nnx.jit
def _forward(model, ids, mask):
  out = model(ids, mask)
  return out.logits, out.aux_loss, out.router_z_loss, out.expert_fraction


def forward(model, mask=True):
  x = fixture_inputs()
  return _forward(model, jnp.asarray(x["input_ids"]),
                  jnp.asarray(x["attention_mask"]) if mask else None)


def check_parity(model):
  """max |Δlogits| over real tokens within 1e-4 * max(1, max|logits|); aux loss 1e-5 rel."""
  logits, aux, _, _ = forward(model)
  want = expected()
  real = fixture_inputs()["attention_mask"].astype(bool)
  diff = np.abs(np.asarray(logits) - want["logits"])[real].max()
  tol = 1e-4 * max(1.0, np.abs(want["logits"]).max())
  assert diff <= tol, f"logits max|Δ| {diff:.3g} > {tol:.3g}"
  rel = abs(float(aux) - float(want["aux_loss"][0])) / float(want["aux_loss"][0])
  assert rel <= 1e-5, f"aux_loss {float(aux)} vs {want['aux_loss'][0]} (rel {rel:.3g})"


@pytest.fixture(scope="module")
def mixtral():
  return jaxlm.from_pretrained(FIXTURE)


# ---- Mixtral parity with transformers --------------------------------------------------------
def test_mixtral_logits_and_aux_loss_match_transformers(mixtral):
  check_parity(mixtral)


def test_aux_loss_excludes_padding(mixtral):
  # Without the mask the padded tokens count too: the fixture's aux loss must then differ,
  # so the parity above really checks the masking.
  _, aux, _, _ = forward(mixtral, mask=False)
  assert abs(float(aux) - float(expected()["aux_loss"][0])) > 1e-3


def _relayout(tensors, fused):
  """The per-expert checkpoint renamed to transformers 5's in-memory names: `mlp.` for
  `block_sparse_moe.`, and (fused) stacked gate_up_proj [E, 2F, D] / down_proj [E, D, F]."""
  out = {k.replace(".block_sparse_moe.", ".mlp."): v for k, v in tensors.items()}
  if not fused:
    return out
  for i in range(2):
    p = f"model.layers.{i}.mlp.experts"
    w = {n: np.stack([out.pop(f"{p}.{e}.{n}.weight") for e in range(4)])
         for n in ("w1", "w2", "w3")}
    out[f"{p}.gate_up_proj"] = np.concatenate([w["w1"], w["w3"]], axis=1)
    out[f"{p}.down_proj"] = w["w2"]
  return out


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "mlp-per-expert"])
def test_transformers5_names_load(tmp_path, fused):
  tensors = load_file(os.path.join(FIXTURE, "model.safetensors"))
  assert any(".block_sparse_moe.experts.3.w2." in k for k in tensors)  # the Hub layout
  d = tmp_path / "mixtral"
  d.mkdir()
  shutil.copy(os.path.join(FIXTURE, "config.json"), d / "config.json")
  save_file(_relayout(tensors, fused), str(d / "model.safetensors"), metadata={"format": "pt"})
  check_parity(jaxlm.from_pretrained(str(d)))


def test_legacy_config_spelling(tmp_path):
  d = tmp_path / "legacy"
  shutil.copytree(FIXTURE, d)
  shutil.copy(d / "config.legacy.json", d / "config.json")
  model = jaxlm.from_pretrained(str(d))
  assert model.config == jaxlm.from_pretrained(FIXTURE).config
  check_parity(model)


def tensor_shapes(directory):
  with safe_open(os.path.join(directory, "model.safetensors"), "np") as st:
    return {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}


def test_save_pretrained_round_trip(mixtral, tmp_path):
  out = str(tmp_path / "saved")
  mixtral.save_pretrained(out)
  again = jaxlm.from_pretrained(out)
  for a, b in zip(forward(again), forward(mixtral)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert tensor_shapes(out) == tensor_shapes(FIXTURE)  # what transformers itself writes
  saved, ref = read_hf_config(out), read_hf_config(FIXTURE)
  for k, v in saved.items():
    if k in ref and k not in ("output_router_logits", "use_cache", "transformers_version"):
      assert v == ref[k], (k, v, ref[k])
  fam = family_of("MixtralForCausalLM", out)
  assert fam.config_from_hf(saved) == fam.config_from_hf(ref)


def test_mixtral_config_errors(tmp_path):
  fam = family_of("MixtralForCausalLM", "test")
  hf = read_hf_config(FIXTURE)
  with pytest.raises(ConfigError, match="router_jitter_noise") as e:
    fam.config_from_hf(dict(hf, router_jitter_noise=0.1))
  assert "\n" not in str(e.value)
  cfg = fam.config_from_hf(hf)
  with pytest.raises(ConfigError, match="moe_capacity_factor"):
    fam.config_to_hf(cfg.replace(moe_capacity_factor=1.25), "MixtralForCausalLM")
  # A missing expert tensor is named.
  d = tmp_path / "broken"
  shutil.copytree(FIXTURE, d)
  t = load_file(str(d / "model.safetensors"))
  del t["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
  save_file(t, str(d / "model.safetensors"))
  with pytest.raises(DataError, match=r"layers\.1\.block_sparse_moe\.experts\.2\.w3"):
    jaxlm.from_pretrained(str(d))


@pytest.mark.parametrize("kw,key", [
    (dict(num_local_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(num_local_experts=-1), "num_local_experts"),
    (dict(num_local_experts=4, moe_capacity_factor=0.0), "moe_capacity_factor"),
    (dict(num_local_experts=4, router_z_loss_coef=-1.0), "router_z_loss_coef"),
])
def test_bad_moe_config_is_one_line(kw, key):
  with pytest.raises(ConfigError, match=key) as e:
    ModelConfig(**kw)
  assert "\n" not in str(e.value)


# ---- the layer against a dense reference ----------------------------------------------------
D, F, E, K = 16, 24, 4, 2


def make_moe(gated=True, bias=False, capacity_factor=None, dtype=jnp.float32, seed=0,
             block_size=128):
  moe = MoE(D, F, E, K, activation="silu" if gated else "gelu", gated=gated, use_bias=bias,
            capacity_factor=capacity_factor, block_size=block_size, init_std=0.3, dtype=dtype,
            rngs=nnx.Rngs(seed))
  if bias:  # non-zero biases, so a misplaced one shows
    for i, name in enumerate(("gate_bias", "up_bias", "down_bias")):
      p = getattr(moe, name)
      if p is not None:
        p.set_value(0.1 * jax.random.normal(jax.random.key(100 + i), p.get_value().shape))
  return moe


def dense_reference(moe, x_ND):
  """Every expert on every token, weighted by the renormalized top-k gates (0 elsewhere)."""
  w_NK, idx_NK = route(moe.router(x_ND), K)
  gates_NE = jnp.zeros((x_ND.shape[0], E)).at[jnp.arange(x_ND.shape[0])[:, None], idx_NK].set(w_NK)

  def bias(b):
    return 0.0 if b is None else b[...][:, None, :]

  up_ENF = jnp.einsum("nd,edf->enf", x_ND, moe.up[...]) + bias(moe.up_bias)
  if moe.gate is not None:
    h_ENF = moe.act(jnp.einsum("nd,edf->enf", x_ND, moe.gate[...]) + bias(moe.gate_bias)) * up_ENF
  else:
    h_ENF = moe.act(up_ENF)
  y_END = jnp.einsum("enf,efd->end", h_ENF, moe.down[...]) + bias(moe.down_bias)
  return jnp.einsum("end,ne->nd", y_END, gates_NE)


@nnx.jit
def apply(moe, x_ND):
  y = moe(x_ND[None])[0]
  pop_router_stats(moe)
  return y


@nnx.jit(static_argnums=0)
def loss_and_grads(fn, moe, x):
  def loss(m, x):
    return jnp.sum(jnp.sin(fn(m, x)))  # a non-trivial cotangent
  return nnx.value_and_grad(loss, argnums=(0, 1))(moe, x)


def tokens(n=40, seed=1):
  return jax.random.normal(jax.random.key(seed), (n, D))


def _moe_fn(m, x):
  return m(x[None])[0]


@pytest.mark.parametrize("gated,bias,block,n", [(True, False, 128, 40), (False, True, 128, 40),
                                               (True, True, 2, 96)],
                         ids=["swiglu", "plain-bias", "many-chunks"])
def test_dropless_matches_dense_reference(gated, bias, block, n):
  # many-chunks: blocks of 2 rows, ~48 slots per expert: runs of ~24 blocks, walked in
  # chunks of 8, then a partial chunk, and unused blocks at the end.
  moe, x = make_moe(gated, bias, block_size=block), tokens(n)
  np.testing.assert_allclose(apply(moe, x), dense_reference(moe, x), atol=2e-5, rtol=1e-5)
  (l1, (g1, gx1)) = loss_and_grads(_moe_fn, moe, x)
  pop_router_stats(moe)
  (l2, (g2, gx2)) = loss_and_grads(dense_reference, moe, x)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  np.testing.assert_allclose(gx1, gx2, atol=2e-5, rtol=1e-4)
  flat1, flat2 = dict(nnx.to_flat_state(g1)), dict(nnx.to_flat_state(g2))
  assert flat1.keys() == flat2.keys() and len(flat1) == 1 + (3 if gated else 2) * (1 + bias)
  for k in flat1:
    a, b = flat1[k].get_value(), flat2[k].get_value()
    assert np.abs(np.asarray(a)).max() > 0, k
    np.testing.assert_allclose(a, b, atol=3e-5, rtol=1e-4, err_msg=str(k))


def test_large_capacity_equals_dropless():
  x = tokens()
  dropless, big = make_moe(), make_moe(capacity_factor=E / K)  # C = N: nothing can drop
  assert capacity(E / K, 40, E, K) == 40
  np.testing.assert_allclose(apply(big, x), apply(dropless, x), atol=1e-6, rtol=1e-6)


def capacity_reference(moe, x_ND, C):
  """Slots kept in priority order (all first choices, then second choices; token order
  within each), at most C per expert; dropped slots add nothing."""
  w_NK, idx_NK = (np.asarray(a) for a in route(moe.router(x_ND), K))
  ref = np.asarray(dense_reference_per_expert(moe, x_ND))  # [E, N, D]
  used, kept = np.zeros(E, int), np.zeros_like(idx_NK, bool)
  for j in range(K):
    for n in range(x_ND.shape[0]):
      e = idx_NK[n, j]
      if used[e] < C:
        used[e] += 1
        kept[n, j] = True
  y = np.zeros(x_ND.shape, np.float32)
  for n in range(x_ND.shape[0]):
    for j in range(K):
      if kept[n, j]:
        y[n] += w_NK[n, j] * ref[idx_NK[n, j], n]
  return y, kept


def dense_reference_per_expert(moe, x_ND):
  h = jax.nn.silu(jnp.einsum("nd,edf->enf", x_ND, moe.gate[...])) * jnp.einsum(
      "nd,edf->enf", x_ND, moe.up[...])
  return jnp.einsum("enf,efd->end", h, moe.down[...])


def test_small_capacity_drops_exactly_the_overflow():
  x = tokens(n=64)
  moe = make_moe(capacity_factor=0.5)
  C = capacity(0.5, 64, E, K)
  assert C == 16
  want, kept = capacity_reference(moe, x, C)
  assert 0 < (~kept).sum() < kept.size  # some, not all, slots dropped
  np.testing.assert_allclose(apply(moe, x), want, atol=2e-5, rtol=1e-5)
  # Gradients flow through kept slots only and match the reference's.
  g = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x[None])[0] ** 2), argnums=1))(moe, x)
  g_ref = jax.grad(lambda x: jnp.sum(jnp.asarray(capacity_reference_jax(moe, x, kept)) ** 2))(x)
  np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=1e-4)


def capacity_reference_jax(moe, x_ND, kept):
  w_NK, idx_NK = route(moe.router(x_ND), K)
  ref_END = dense_reference_per_expert(moe, x_ND)
  n = jnp.arange(x_ND.shape[0])[:, None]
  return jnp.einsum("nkd,nk->nd", ref_END[idx_NK, n], w_NK * kept)


def test_bf16_close_to_fp32():
  x = tokens(n=64)
  m32, m16 = make_moe(), make_moe(dtype=jnp.bfloat16)
  y32, y16 = apply(m32, x), apply(m16, x)
  assert y16.dtype == jnp.float32
  err = float(jnp.abs(y16 - y32).max() / jnp.abs(y32).max())
  assert 1e-5 < err < 2e-2, err  # bf16 operands really used, f32 accumulation
  grad = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x[None]) ** 2), argnums=1))
  g32, g16 = grad(m32, x), grad(m16, x)
  assert float(jnp.abs(g16 - g32).max() / jnp.abs(g32).max()) < 3e-2


# ---- router statistics ---------------------------------------------------------------------
def test_router_losses_against_manual_formulas():
  moe = make_moe()
  mask = (jnp.arange(48) % 5 != 0).astype(jnp.int32)
  layers = []
  for seed in (1, 2):  # two "layers": the aux loss combines them before the product
    moe(tokens(n=48, seed=seed)[None])
    logits, idx = pop_router_stats(moe)
    layers.append((logits, idx, mask))
  got = router_losses(layers, E, K)
  m = np.asarray(mask, bool)
  lg = [np.asarray(l, np.float64)[m] for l, _, _ in layers]
  ix = [np.asarray(i)[m] for _, i, _ in layers]
  p = [np.exp(l - l.max(-1, keepdims=True)) for l in lg]
  p = [q / q.sum(-1, keepdims=True) for q in p]
  frac = np.stack([np.bincount(i.ravel(), minlength=E) / i.size for i in ix])
  f_e = sum(np.bincount(i.ravel(), minlength=E) for i in ix) / (2 * m.sum())
  p_e = sum(q.sum(0) for q in p) / (2 * m.sum())
  lse = [np.log(np.exp(l).sum(-1)) for l in lg]
  np.testing.assert_allclose(got["aux_loss"], E * np.sum(f_e * p_e), rtol=1e-5)
  np.testing.assert_allclose(got["router_z_loss"], np.mean(np.concatenate(lse) ** 2), rtol=1e-5)
  np.testing.assert_allclose(got["expert_fraction"], frac, atol=1e-6)
  # Not the mean of per-layer losses (what a per-layer shortcut would give).
  per_layer = [router_losses([l], E, K)["aux_loss"] for l in layers]
  assert abs(float(got["aux_loss"]) - float(np.mean(per_layer))) > 1e-4


def kept_stats(model):
  """MoE layers of `model` whose router statistics are still in the table."""
  return [p for p, m in nnx.iter_modules(model) if isinstance(m, MoE) and m in _ROUTER_STATS]


def test_model_router_outputs_and_no_accumulation(mixtral):
  _, aux, z, frac = forward(mixtral)
  assert frac.shape == (2, 4) and np.allclose(np.asarray(frac).sum(-1), 1.0)
  assert float(z) > 0 and np.isfinite(float(z))
  # Nothing is left behind (not in the table, not on the model), and repeated calls agree.
  assert not kept_stats(mixtral) and not nnx.to_flat_state(nnx.state(mixtral, nnx.Intermediate))
  assert float(forward(mixtral)[1]) == float(aux)
  # The train-step pattern: split once, merge inside jax.jit; the aux loss has gradients.
  graphdef, params = nnx.split(mixtral, nnx.Param)
  x = fixture_inputs()

  @jax.jit
  def aux_and_grad(params):
    def f(params):
      out = nnx.merge(graphdef, params)(jnp.asarray(x["input_ids"]),
                                        jnp.asarray(x["attention_mask"]))
      return out.aux_loss + out.router_z_loss
    return jax.value_and_grad(f)(params)

  val, grads = aux_and_grad(params)
  np.testing.assert_allclose(val, float(aux) + float(z), rtol=1e-6)
  router_g = grads["model"]["layers"][0]["mlp"]["router"]["kernel"].get_value()
  assert np.abs(np.asarray(router_g)).max() > 0
  # Eager too.
  mixtral(jnp.asarray(x["input_ids"][:, :3]))
  assert not kept_stats(mixtral)


def test_model_called_inside_a_nested_transform(mixtral):
  # Greedy decoding: the model is merged in jax.jit and run in a fori_loop body, a trace
  # below the one that built it (NNX would refuse a module mutation there).
  graphdef, state = nnx.split(mixtral)

  @jax.jit
  def decode(state, ids_BT):
    m = nnx.merge(graphdef, state)

    def step(t, carry):
      ids_BT, aux = carry
      out = m(ids_BT)
      nxt = jnp.argmax(out.logits[:, t - 1], -1).astype(ids_BT.dtype)
      return ids_BT.at[:, t].set(nxt), aux + out.aux_loss

    return jax.lax.fori_loop(3, 6, step, (ids_BT, jnp.float32(0)))

  ids, aux = decode(state, jnp.asarray(fixture_inputs()["input_ids"][:, :6]))
  assert np.isfinite(float(aux)) and float(aux) > 0 and ids.shape == (2, 6)


def test_router_outputs_mask_size_is_checked(mixtral):
  ids = jnp.ones((1, 5), jnp.int32)

  @nnx.jit
  def run(m, mask):
    m.model(ids)  # the decoder stack only: statistics kept for router_outputs
    assert kept_stats(m)
    return router_outputs(m, mask)

  with pytest.raises(DataError, match="attention_mask has 4 entries"):
    run(mixtral, jnp.ones((1, 4)))
  assert not kept_stats(mixtral)
  assert run(mixtral, None)["expert_fraction"].shape == (2, 4)


# ---- any family can switch MoE on ------------------------------------------------------------
SMALL = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=48, max_position_embeddings=32, num_local_experts=4,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
LLAMA_MOE = ModelConfig(**SMALL, architectures=["LlamaForCausalLM"], model_type="llama",
                        causal=True, norm_type="rmsnorm", norm_position="pre", mlp_type="gated",
                        mlp_bias=False, attention_bias=False, hidden_act="silu",
                        position_embedding_type="rope", tie_word_embeddings=False,
                        type_vocab_size=0)
BERT_MOE = ModelConfig(**SMALL, architectures=["BertForPreTraining"])


def test_bert_with_moe_trains():
  model = build_model(BERT_MOE)
  mlp = model.bert.layers[0].mlp
  assert isinstance(mlp, MoE) and mlp.gate is None and mlp.up_bias.get_value().shape == (4, 48)
  ids = jax.random.randint(jax.random.key(0), (2, 10), 3, 97)
  mask = jnp.ones((2, 10), jnp.int32).at[1, 7:].set(0)
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def loss_fn(params):
    out = nnx.merge(graphdef, params)(ids, mask, jnp.zeros_like(ids))
    mlm = -jnp.mean(jax.nn.log_softmax(out.logits)[..., 5])
    return mlm + 0.01 * out.aux_loss, (mlm, out.aux_loss, out.expert_fraction)

  (loss, (mlm, aux, frac)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  assert np.isfinite(float(loss)) and float(mlm) > 0 and 0.5 < float(aux) < 4.0
  assert frac.shape == (2, 4)
  g = grads["bert"]["layers"][1]["mlp"]["down_bias"].get_value()
  assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0


def test_llama_with_moe_trains_and_saves_as_jaxlm_export(tmp_path):
  model = build_model(LLAMA_MOE)
  ids = jax.random.randint(jax.random.key(1), (2, 12), 3, 97)

  @nnx.jit
  def loss_fn(model):
    out = model(ids)
    logp = jax.nn.log_softmax(out.logits[:, :-1])
    nll = -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))
    return nll + 0.01 * out.aux_loss + 0.001 * out.router_z_loss

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  assert np.isfinite(float(loss))
  assert np.abs(np.asarray(grads.model.layers[0].mlp.gate.get_value())).max() > 0
  # transformers' Llama has no experts: save_pretrained writes a jaxlm export instead.
  assert model.save_pretrained(str(tmp_path)) == "jaxlm"
  again = jaxlm.from_pretrained(str(tmp_path))
  logits = nnx.jit(lambda m: m(ids).logits)
  np.testing.assert_array_equal(logits(again), logits(model))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["num_local_experts"] == 4


def test_t5_with_moe_and_per_stack_masks():
  # Encoder and decoder stacks route different token counts, so each gets its own mask.
  from jaxlm.hf.t5 import config_from_hf
  cfg = config_from_hf({"d_model": 32, "num_layers": 2, "num_heads": 4, "d_kv": 8, "d_ff": 48,
                        "vocab_size": 97, "feed_forward_proj": "relu"})
  model = build_model(cfg.replace(num_local_experts=4,
                                  architectures=["T5ForConditionalGeneration"]))
  ids, dec = jnp.full((2, 7), 5, jnp.int32), jnp.full((2, 5), 6, jnp.int32)
  enc_mask, dec_mask = jnp.ones((2, 7)).at[1, 5:].set(0), jnp.ones((2, 5)).at[1, 4:].set(0)

  @nnx.jit
  def run(m):
    m.decode(dec, m.encode(ids, enc_mask), enc_mask, dec_mask)
    return router_outputs(m, {"encoder": enc_mask, "decoder": dec_mask})

  out = run(model)
  assert out["expert_fraction"].shape == (4, 4) and np.isfinite(float(out["aux_loss"]))
  # All-identical tokens route identically: each layer sends every slot to the same 2 experts.
  frac = np.asarray(out["expert_fraction"])
  assert ((frac == 0.5) | (frac == 0.0)).all()
