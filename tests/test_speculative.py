"""Speculative decoding: greedy output equal to the target's (and to transformers'
`generate`) on every decoder fixture, whatever the draft proposes; rolled-back caches;
the rejection rule's first-token distribution against the target's exact one; bad
drafts."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

import jaxlm
from conftest import FIXTURES, fixture
from jaxlm import ConfigError
from jaxlm.generate import generate
from jaxlm.generate.sampling import Sampling, process
from jaxlm.generate.speculative import speculative_generate

DECODERS = ("gpt2", "llama", "mistral", "bloom", "mpt", "gpt_neox", "mixtral")


def _perturbed(model, scale: float, seed: int):
  """A draft that agrees with the target only part of the time: its weights plus noise."""
  graphdef, state = nnx.split(model)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [x + scale * x.std() * jax.random.normal(k, x.shape, x.dtype)
           if x.dtype.kind == "f" and x.size > 1 else x for x, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(tree, noisy))


@pytest.fixture(scope="module")
def models():
  return {name: jaxlm.from_pretrained(fixture(name)) for name in DECODERS}


@pytest.mark.parametrize("name", DECODERS)
def test_greedy_equals_the_targets_output(models, name):
  """transformers' greedy `generate` on a left-padded batch where one row stops at eos
  (tests/fixtures/hf/make_generation.py), reproduced with a noisy draft: some proposals
  are accepted, some rolled back (Mistral's 4-token window wraps its cache)."""
  target = models[name]
  g = np.load(os.path.join(FIXTURES, name, "generate.npz"))
  want = g["sequences"]
  kw = dict(attention_mask=g["attention_mask"], max_new_tokens=int(g["max_new_tokens"]),
            eos_token_id=int(g["eos_token_id"]), pad_token_id=int(g["pad_token_id"]))
  draft = _perturbed(target, 0.1, seed=1)
  got, stats = speculative_generate(target, draft, g["input_ids"], num_draft_tokens=3,
                                    s=Sampling(), return_stats=True, **kw)
  np.testing.assert_array_equal(got[:, :want.shape[1]], want)
  assert (got[:, want.shape[1]:] == int(g["pad_token_id"])).all()
  assert 0.0 < stats["mean_accepted"] < 3.0, stats  # both paths ran
  if name == "llama":  # the public API, with the target as its own draft (all accepted)
    np.testing.assert_array_equal(
        generate(target, g["input_ids"], draft_model=target, num_draft_tokens=4, **kw), got)


def test_single_row_and_long_output(models):
  """A batch of one rolls back exactly (no empty slots); 40 tokens past a 4-token window."""
  target = models["mistral"]
  ids = np.random.default_rng(3).integers(5, target.config.vocab_size, (1, 7))
  want = generate(target, ids, max_new_tokens=40, eos_token_id=-1)
  for k in (1, 5):
    got, stats = speculative_generate(target, _perturbed(target, 0.3, seed=k), ids,
                                      max_new_tokens=40, num_draft_tokens=k, s=Sampling(),
                                      eos_token_id=-1, return_stats=True)
    np.testing.assert_array_equal(got, want, err_msg=f"k={k}")
    assert stats["rounds"] < 40 or k == 1


def test_sampled_first_token_follows_the_target(models):
  """20,000 rows, one new token each, drawn by the accept/reject rule: the histogram is
  within total variation 0.03 of the target's filtered distribution, while the draft's
  own distribution is far from it (so passing through the draft's samples would fail)."""
  target = models["llama"]
  draft = _perturbed(target, 1.0, seed=7)
  s = Sampling(temperature=0.8, top_k=6)
  prompt = np.random.default_rng(5).integers(5, target.config.vocab_size, 6)
  exact = lambda m: np.asarray(jax.nn.softmax(process(m(prompt[None]).logits[:, -1], None, s)))[0]
  p, q = exact(target), exact(draft)
  n = 20_000
  out = speculative_generate(target, draft, np.tile(prompt, (n, 1)), max_new_tokens=1,
                             num_draft_tokens=3, s=s, eos_token_id=-1, seed=11)
  freq = np.bincount(out[:, -1], minlength=p.size) / n
  tv = 0.5 * np.abs(freq - p).sum()
  assert tv < 0.03, tv
  assert 0.5 * np.abs(q - p).sum() > 0.2


def test_bad_drafts(models):
  target, ids = models["llama"], np.array([[5, 6, 7]])
  other = jaxlm.build_model(target.config.replace(vocab_size=300, num_hidden_layers=1))
  with pytest.raises(ConfigError, match="vocab_size .* differs from the target"):
    generate(target, ids, max_new_tokens=2, draft_model=other)
  with pytest.raises(ConfigError, match="num_draft_tokens"):
    generate(target, ids, max_new_tokens=2, draft_model=target, num_draft_tokens=0)
  with pytest.raises(ConfigError, match="repetition_penalty"):
    generate(target, ids, max_new_tokens=2, draft_model=target, repetition_penalty=1.3)
  with pytest.raises(ConfigError, match="decoder-only"):
    generate(target, ids, max_new_tokens=2, draft_model=jaxlm.from_pretrained(fixture("t5")))
