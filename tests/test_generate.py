"""Generation: the KV cache against full forward passes, greedy parity with transformers'
`generate` (committed fixtures, tests/fixtures/hf/make_generation.py), one compile per
bucket, sampling against its exact distribution, and bad requests."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlm
from conftest import FIXTURES, fixture
from jaxlm import ConfigError
from jaxlm.generate import decode, generate, stream

DECODERS = ("gpt2", "llama", "mistral", "bloom", "mpt", "gpt_neox", "mixtral")
SEQ2SEQ = ("t5", "t5_v1_1")


@pytest.fixture(scope="module")
def models():
  return {name: jaxlm.from_pretrained(fixture(name)) for name in DECODERS + SEQ2SEQ}


def _left_padded(rng, lengths, V, pad):
  P = max(lengths)
  ids = np.full((len(lengths), P), pad, np.int64)
  mask = np.zeros((len(lengths), P), np.int64)
  for b, n in enumerate(lengths):
    ids[b, P - n:], mask[b, P - n:] = rng.integers(5, V, n), 1
  return ids, mask


# ---- the cache: every step equals a full forward pass over the same prefix ----------------
@pytest.mark.parametrize("name", DECODERS)
def test_cached_decoding_equals_full_forward(models, name):
  """A left-padded batch: prefill 6 columns, then 14 single-token steps. Mistral's
  fixture has a 4-token window, so its 4-slot rolling cache wraps around many times."""
  model = models[name]
  V, pad = model.config.vocab_size, model.config.pad_token_id or 0
  ids, mask = _left_padded(np.random.default_rng(0), [20, 13, 16], V, pad)
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  full = np.asarray(model(ids, mask, position_ids=pos).logits)
  cache = model.init_cache(3, 20)
  if name == "mistral":
    assert cache[0]["self"].size == model.config.sliding_window == 4
  graphdef, params = nnx.split(model)  # compiled: two programs instead of eager ops a step
  call = jax.jit(lambda p, ids, mask, position_ids, cache: nnx.merge(graphdef, p)(
      ids, mask, position_ids=position_ids, cache=cache))
  model = functools.partial(call, params)
  out = model(ids[:, :6], mask[:, :6], position_ids=pos[:, :6], cache=cache)
  real = mask[:, :6, None] > 0
  np.testing.assert_allclose(np.where(real, out.logits, 0), np.where(real, full[:, :6], 0),
                             atol=1e-5)
  cache = out.cache
  for t in range(6, 20):
    out = model(ids[:, t:t + 1], mask[:, t:t + 1], position_ids=pos[:, t:t + 1], cache=cache)
    cache = out.cache
    real = mask[:, t, None] > 0
    np.testing.assert_allclose(np.where(real, out.logits[:, 0], 0), np.where(real, full[:, t], 0),
                               atol=1e-5, err_msg=f"{name} step {t}")
  assert int(cache[0]["self"].index) == 20


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_t5_cached_decoding_equals_full_forward(models, name):
  model = models[name]
  d = np.load(os.path.join(FIXTURES, name, "inputs.npz"))
  ids, am, dec = d["input_ids"], d["attention_mask"], d["decoder_input_ids"]
  full = np.asarray(model(ids, am, decoder_input_ids=dec).logits)
  enc = model.encode(ids, am)  # the encoder runs once
  cache = model.init_cache(2, dec.shape[1])
  out = model.decode(dec[:, :1], enc, am, cache=cache)
  assert cache[0]["cross"].size == 0 and out.cache[0]["cross"].size == ids.shape[1]
  np.testing.assert_allclose(out.logits[:, 0], full[:, 0], atol=1e-5)
  cache = out.cache
  for t in range(1, dec.shape[1]):
    out = model.decode(dec[:, t:t + 1], None, am, cache=cache)  # cross K/V from the cache
    cache = out.cache
    np.testing.assert_allclose(out.logits[:, 0], full[:, t], atol=1e-5, err_msg=f"step {t}")


# ---- greedy parity with transformers -----------------------------------------------------------
@pytest.mark.parametrize("name", DECODERS + SEQ2SEQ)
def test_greedy_matches_transformers_generate(models, name):
  g = np.load(os.path.join(FIXTURES, name, "generate.npz"))
  got = generate(models[name], g["input_ids"], attention_mask=g["attention_mask"],
                 max_new_tokens=int(g["max_new_tokens"]), eos_token_id=int(g["eos_token_id"]),
                 pad_token_id=int(g["pad_token_id"]))
  want = g["sequences"]
  assert g["stopped"].any() and not g["stopped"].all()  # a row stops at eos, others run on
  # transformers stops the whole batch once every row is done; we always return
  # max_new_tokens columns (pad after eos), so compare up to its length.
  np.testing.assert_array_equal(got[:, :want.shape[1]], want)
  assert (got[:, want.shape[1]:] == int(g["pad_token_id"])).all()


# ---- one compile per bucket ---------------------------------------------------------------------
def test_one_compile_per_bucket(models):
  cfg = models["llama"].config.replace(max_position_embeddings=256)  # room for 64 tokens
  model = jaxlm.build_model(cfg, seed=0)
  V = cfg.vocab_size
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, _secs, **_: compiles.append(event) if "backend_compile" in event else None)
  ids_a, mask_a = _left_padded(np.random.default_rng(1), [9, 5], V, 0)
  generate(model, ids_a, attention_mask=mask_a, max_new_tokens=64, eos_token_id=-5)
  n_first = decode._compiled_run._cache_size()
  compiles.clear()
  ids_b, mask_b = _left_padded(np.random.default_rng(2), [3, 12], V, 0)  # same bucket (16)
  out = generate(model, ids_b, attention_mask=mask_b, max_new_tokens=64, eos_token_id=-5)
  assert out.shape == (2, 12 + 64)
  assert decode._compiled_run._cache_size() == n_first and not compiles, compiles


# ---- sampling -----------------------------------------------------------------------------------
def _filtered_probs(logits, temperature, top_k, top_p):
  """Hugging Face's warpers in NumPy (float64), as an independent reference."""
  x = logits.astype(np.float64) / temperature
  x = np.where(x < np.sort(x)[-top_k], -np.inf, x)
  order = np.argsort(x)
  p_sorted = np.exp(x[order] - x.max())
  p_sorted /= p_sorted.sum()
  drop = np.cumsum(p_sorted) <= 1 - top_p
  drop[-1] = False
  x[order[drop]] = -np.inf
  p = np.exp(x - x.max())
  return p / p.sum()


def test_sampling_matches_the_exact_filtered_distribution(models):
  model = models["gpt2"]
  prompt = np.array([[11, 27, 5, 40, 33, 8]])
  logits = np.asarray(model(prompt).logits[0, -1])
  want = _filtered_probs(logits, 0.7, 20, 0.9)
  n = 8000
  tokens = generate(model, np.repeat(prompt, n, 0), max_new_tokens=1, temperature=0.7,
                    top_k=20, top_p=0.9, seed=3, eos_token_id=-5)[:, -1]
  got = np.bincount(tokens, minlength=len(want)) / n
  tv = 0.5 * np.abs(got - want).sum()
  assert tv < 0.03, tv
  assert (got[want == 0] == 0).all()  # nothing outside the filtered support
  assert 2 < (want > 0).sum() <= 20  # the filters really cut the vocabulary


def test_seeds_reproduce_and_top_k_1_is_greedy(models):
  model = models["llama"]
  ids, mask = _left_padded(np.random.default_rng(4), [7, 4], model.config.vocab_size, 0)
  kw = dict(attention_mask=mask, max_new_tokens=10, eos_token_id=-5)
  a = generate(model, ids, temperature=1.0, seed=7, **kw)
  np.testing.assert_array_equal(a, generate(model, ids, temperature=1.0, seed=7, **kw))
  assert not np.array_equal(a, generate(model, ids, temperature=1.0, seed=8, **kw))
  greedy, scores = generate(model, ids, return_scores=True, **kw)
  np.testing.assert_array_equal(generate(model, ids, temperature=0.9, top_k=1, seed=1, **kw),
                                greedy)
  assert scores.shape == (2, 10) and (scores <= 0).all() and np.isfinite(scores).all()
  # Streaming yields the same tokens, one step at a time.
  streamed = np.stack(list(stream(model, ids, **kw)), 1)
  np.testing.assert_array_equal(streamed, greedy[:, ids.shape[1]:])


def test_repetition_penalty_follows_transformers_formula(models):
  from jaxlm.generate.sampling import repetition_penalty
  logits = jnp.array([[2.0, -1.0, 0.5, -3.0]])
  seen = jnp.array([[True, True, False, False]])
  np.testing.assert_allclose(repetition_penalty(logits, seen, 2.0), [[1.0, -2.0, 0.5, -3.0]])
  model = models["gpt2"]
  ids = np.array([[11, 12, 11, 12, 11, 12]])
  plain = generate(model, ids, max_new_tokens=8, eos_token_id=-5)
  penal = generate(model, ids, max_new_tokens=8, eos_token_id=-5, repetition_penalty=50.0)
  new = penal[0, 6:].tolist()
  assert len(set(new)) == len(new)  # a huge penalty never repeats a token
  assert not np.array_equal(plain, penal)


# ---- bad requests -------------------------------------------------------------------------------
def test_bad_requests_are_one_line_errors(models):
  model = models["gpt2"]
  limit = model.config.max_position_embeddings
  cases = [
      (dict(input_ids=np.ones((1, limit + 1), int), max_new_tokens=1), "longer than the model"),
      (dict(input_ids=np.ones((1, 4), int), max_new_tokens=limit), "past max_position"),
      (dict(input_ids=np.ones((1, 4), int), max_new_tokens=2, top_p=0.0), "top_p must be"),
      (dict(input_ids=np.ones((1, 4), int), max_new_tokens=2, top_p=1.5), "top_p must be"),
      (dict(input_ids=np.ones((1, 4), int), max_new_tokens=2, temperature=-1.0),
       "temperature must be"),
  ]
  for kw, match in cases:
    with pytest.raises(ConfigError, match=match) as e:
      generate(model, **kw)
    assert "\n" not in str(e.value)
  bert = jaxlm.from_pretrained(fixture("bert_mlm"))
  with pytest.raises(ConfigError, match="BertForMaskedLM has no LM head"):
    generate(bert, np.ones((1, 4), int), max_new_tokens=2)
