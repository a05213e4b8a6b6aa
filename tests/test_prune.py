"""Pruning (jaxlm/compress/prune.py) and recovery with fixed masks (compress/recover.py),
on a tiny GPT-2-shaped decoder built here (2 layers, d 64, vocab 128)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import gpt2_small
from jaxlm import experiment, tasks
from jaxlm.compress.prune import (
  PruneSpec,
  activation_norms,
  calibration_batches,
  keep_mask,
  layer_sparsity,
  prunable_denses,
  prune,
)
from jaxlm.compress.recover import mask_tree, mask_violations, recover, train_config
from jaxlm.data.corpus import load_corpus
from jaxlm.errors import ConfigError
from jaxlm.layers.linear import Dense
from jaxlm.models import auto
from jaxlm.params import flat_params, path_name

VOCAB = 128
MC = experiment.model_config(gpt2_small.get_config("tiny")).replace(vocab_size=VOCAB)
KERNELS = [f"model.layers.{i}.{m}.kernel" for i in range(2)
           for m in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down")]


def tiny(seed: int = 0, **overrides):
  return auto.build_model(MC.replace(**overrides) if overrides else MC, seed=seed)


def ids(seed: int, shape=(8, 32)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


def padded_batch(seed: int = 1) -> dict:
  """Calibration rows whose tails are padding (attention_mask 0) and one padding row."""
  x = ids(seed)
  mask = np.ones_like(x)
  mask[0, 20:], mask[3, 5:] = 0, 0
  return {"input_ids": x, "attention_mask": mask,
          "example_weight": np.array([1, 1, 1, 1, 1, 1, 1, 0], np.float32)}


@pytest.fixture(scope="module")
def dense_state():
  model = tiny()
  return jax.tree.map(jnp.copy, nnx.state(model))


def fresh(dense_state):
  model = tiny()
  nnx.update(model, jax.tree.map(jnp.copy, dense_state))
  return model


# ---- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    ({"sparsity": -0.1}, "sparsity"), ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": float("nan")}, "sparsity"), ({"sparsity": True}, "sparsity"),
    ({"sparsity": "0.5"}, "sparsity"), ({"method": "snip"}, "method"),
    ({"pattern": "dense"}, "pattern"), ({"pattern": "4:2"}, "pattern"),
    ({"pattern": "0:4"}, "pattern"), ({"pattern": "2-4"}, "pattern"),
    ({"pattern": "2:4", "sparsity": 0.6}, "sparsity=0.6"),
    ({"pattern": "2:4", "scope": "layer"}, "scope"), ({"scope": "row"}, "scope"),
    ({"method": "wanda", "scope": "global"}, "scope='global'"),
    ({"method": "wanda"}, "calibration"),
    ({"pattern": "1:3"}, "model.layers.0.attn.k.kernel has shape (64, 64)"),
])
def test_bad_input_is_one_line_config_error_and_changes_nothing(dense_state, kwargs, words):
  model = fresh(dense_state)
  before = flat_params(model)
  with pytest.raises(ConfigError) as e:
    prune(model, **kwargs)
  msg = str(e.value)
  assert words in msg and "\n" not in msg
  after = flat_params(model)
  assert all(np.array_equal(before[k], after[k]) for k in before)


def test_model_without_block_denses_is_refused():
  with pytest.raises(ConfigError, match="no Dense q/k/v/o/up/gate/down"):
    prune(nnx.Sequential(Dense(4, 4, rngs=nnx.Rngs(0))))


# ---- masks: the groups and counts ---------------------------------------------------------
def test_keep_mask_compares_per_output_neuron_per_layer_and_in_groups():
  s = jnp.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])  # [in 4, out 2]
  out = keep_mask(s, PruneSpec("wanda", 0.5))  # column by column: each loses 2
  assert out.tolist() == [[False, False], [False, False], [True, True], [True, True]]
  layer = keep_mask(s, PruneSpec("magnitude", 0.5))  # the 4 smallest of all 8
  assert layer.tolist() == [[False, True]] * 4
  nm = keep_mask(s, PruneSpec("magnitude", pattern="2:4"))
  assert nm.tolist() == out.tolist()  # one group of 4 per column: its top 2 stay
  assert keep_mask(s, PruneSpec("magnitude", pattern="1:2")).tolist() == [
      [False, False], [True, True], [False, False], [True, True]]


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_2_4_holds_exactly(dense_state, method):
  model = fresh(dense_state)
  _, rep = prune(model, method, pattern="2:4", calibration=[padded_batch()])
  assert sorted(rep.masks) == sorted(KERNELS) and rep.sparsity == 0.5
  for name, w in flat_params(model).items():
    if name in rep.masks:
      nonzero = (w.reshape(w.shape[0] // 4, 4, w.shape[1]) != 0).sum(axis=1)
      assert nonzero.max() <= 2, name
      assert (nonzero == 2).all(), name  # random weights: exactly 2 survive
      assert rep.layers[name] == 0.5


def test_unstructured_counts_are_exact_and_only_targets_change(dense_state):
  model = fresh(dense_state)
  before = flat_params(model)
  _, rep = prune(model, "wanda", 0.5, calibration=[padded_batch()])  # per output neuron
  after = flat_params(model)
  for name in before:
    if name in rep.masks:
      zeros_per_column = (after[name] == 0).sum(axis=0)
      assert (zeros_per_column == after[name].shape[0] // 2).all(), name
      keep = np.asarray(rep.masks[name])
      np.testing.assert_array_equal(after[name], np.where(keep, before[name], 0))
    else:  # embeddings (the tied head), norms, biases
      np.testing.assert_array_equal(after[name], before[name])
  assert json.loads(json.dumps(rep.to_dict()))["sparsity"] == 0.5


def test_magnitude_layer_scope_drops_the_smallest(dense_state):
  model = fresh(dense_state)
  before = flat_params(model)
  _, rep = prune(model, "magnitude", 0.3)
  for name in KERNELS:
    w, keep = np.abs(before[name]), np.asarray(rep.masks[name])
    assert (~keep).sum() == int(0.3 * w.size)
    assert w[~keep].max() <= w[keep].min()


def test_global_magnitude_hits_the_total_not_each_layer(dense_state):
  model = fresh(dense_state)
  before = flat_params(model)
  _, rep = prune(model, "magnitude", 0.4, scope="global")
  total = sum(before[n].size for n in KERNELS)
  assert sum(int((~np.asarray(m)).sum()) for m in rep.masks.values()) == int(0.4 * total)
  assert abs(rep.sparsity - 0.4) < 1 / total
  assert max(rep.layers.values()) - min(rep.layers.values()) > 0.01
  threshold = max(np.abs(before[n])[~np.asarray(rep.masks[n])].max() for n in KERNELS)
  assert all(np.abs(before[n])[np.asarray(rep.masks[n])].min() >= threshold for n in KERNELS)


# ---- Wanda -------------------------------------------------------------------------------
def test_activation_norms_match_inputs_captured_eagerly(dense_state, monkeypatch):
  """The recorders' ||X_i|| equals one computed from every Dense input seen in an eager
  forward, over real tokens only (padding positions and the padding row excluded)."""
  model = fresh(dense_state)
  batch = padded_batch()
  names_before = sorted(flat_params(model))
  norms = activation_norms(model, [batch])
  assert sorted(flat_params(model)) == names_before  # recorders removed
  seen = {}
  call = Dense.__call__

  def capture(self, x):
    seen[id(self)] = np.asarray(x, np.float64)
    return call(self, x)
  monkeypatch.setattr(Dense, "__call__", capture)
  model(batch["input_ids"], batch["attention_mask"])
  w_BT = batch["attention_mask"] * batch["example_weight"][:, None]
  for path, dense in prunable_denses(model):
    x = seen[id(dense)]
    ref = np.sqrt(np.einsum("bti,bt->i", x * x, w_BT))
    np.testing.assert_allclose(norms[path_name(path) + ".kernel"], ref, rtol=2e-5)
  # Padding counts if it is not masked out: the weighting is what excludes it.
  x = seen[id(model.model.layers[0].attn.q)]
  assert not np.allclose(norms["model.layers.0.attn.q.kernel"], np.sqrt((x * x).sum((0, 1))))


def test_wanda_scores_weights_by_input_norms(dense_state):
  """One pass from the dense model: each mask is keep_mask(|W| * ||X||) per output."""
  model = fresh(dense_state)
  before = flat_params(model)
  norms = activation_norms(model, [padded_batch()])
  _, rep = prune(model, "wanda", 0.5, calibration=[padded_batch()], sequential=False)
  spec = PruneSpec("wanda", 0.5)
  for name in KERNELS:
    want = keep_mask(jnp.abs(before[name]) * norms[name][:, None], spec)
    np.testing.assert_array_equal(rep.masks[name], want)
  # It is not magnitude: the norms change which weights go.
  mag = keep_mask(jnp.abs(before[KERNELS[0]]), spec)
  assert (np.asarray(mag) != np.asarray(rep.masks[KERNELS[0]])).mean() > 0.01
  assert rep.calibration == {"sequences": 7, "tokens": int(padded_batch()["attention_mask"]
                                                           [:7].sum())}


def test_sequential_wanda_sees_earlier_blocks_pruned(dense_state):
  one_pass = fresh(dense_state)
  _, a = prune(one_pass, "wanda", 0.5, calibration=[padded_batch()], sequential=False)
  seq = fresh(dense_state)
  _, b = prune(seq, "wanda", 0.5, calibration=[padded_batch()])
  first = [n for n in KERNELS if ".layers.0." in n]
  assert all(np.array_equal(a.masks[n], b.masks[n]) for n in first)
  assert any(not np.array_equal(a.masks[n], b.masks[n]) for n in KERNELS if n not in first)


def test_wanda_beats_magnitude_when_features_have_outliers():
  """With a few input features 25x larger (the outlier features of trained LMs), Wanda at
  50% keeps the output far closer to the dense model's than magnitude pruning does."""
  def model():
    m = tiny(seed=3)
    for blk in m.model.layers:
      for norm in (blk.attn_norm, blk.mlp_norm):
        norm.scale.set_value(jnp.ones(64).at[jnp.array([3, 17, 40, 51])].set(25.0))
    return m
  test = ids(7, (8, 32))
  ref = model()(test).logits
  errs = {}
  for method in ("magnitude", "wanda"):
    m = model()
    prune(m, method, 0.5, calibration=ids(5, (16, 32)))
    errs[method] = float(jnp.linalg.norm(m(test).logits - ref) / jnp.linalg.norm(ref))
  assert errs["wanda"] < 0.7 * errs["magnitude"], errs


# ---- MoE and the report -------------------------------------------------------------------
def test_moe_experts_are_skipped_and_listed():
  model = tiny(num_local_experts=2, num_experts_per_tok=1)
  _, rep = prune(model, "magnitude", 0.5)
  assert all(".attn." in n for n in rep.masks) and len(rep.masks) == 8
  assert rep.skipped and all(".mlp." in n for n in rep.skipped)
  assert any("router" in n for n in rep.skipped)


# ---- recovery with fixed masks -------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tiny_corpus):
  return load_corpus(str(tiny_corpus))


def test_calibration_batches_are_the_first_train_rows(corpus):
  cfg = gpt2_small.get_config("tiny")
  cal = calibration_batches(corpus, cfg.data, sequences=100, batch_size=32)
  assert [len(b["input_ids"]) for b in cal] == [32, 32, 32, 4]
  first = next(tasks.get("causal").eval_batches(corpus, "train", cfg.data, batch_size=32,
                                                seed=0))
  np.testing.assert_array_equal(cal[0]["input_ids"], first["input_ids"])


def test_recovery_keeps_the_zeros_and_trains_the_rest(corpus):
  cfg = gpt2_small.get_config("tiny")
  task = tasks.get("causal")
  mc = MC.replace(**task.model_ids(corpus.tokenizer, cfg.data))
  model = auto.build_model(mc, seed=0)
  _, rep = prune(model, "magnitude", pattern="2:4")
  before = flat_params(model)
  batches = task.train_iterator(corpus, cfg.data, batch_size=8, seed=0)
  out = recover(model, rep, batches, steps=4,
                  train=train_config(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1))
  after = flat_params(model)
  assert mask_violations(model, rep.masks) == 0
  assert layer_sparsity(model) == rep.layers
  for name, keep in rep.masks.items():
    live = np.asarray(keep)
    assert np.abs(after[name][live] - before[name][live]).mean() > 1e-4, name
  assert not np.array_equal(after["model.embed.embedding"], before["model.embed.embedding"])
  assert len(out["losses"]) == 4 and np.isfinite(out["losses"]).all()
  assert out["skipped_steps"] == 0

  # The same steps without the mask wrapper revive pruned weights: the check can fail.
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(1e-2)
  step = jax.jit(lambda p, s, b: _plain_step(graphdef, tx, p, s, b, frozen))
  p2, _ = step(params, tx.init(params), next(batches))
  nnx.update(model, p2)
  assert mask_violations(model, rep.masks) > 0


def _plain_step(graphdef, tx, params, opt_state, batch, frozen):
  task = tasks.get("causal")

  def loss(p):
    return task.loss(task.stats(nnx.merge(graphdef, p, frozen, copy=True), batch))
  grads = jax.grad(loss)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def test_recover_rejects_bad_masks_and_steps(dense_state):
  model = fresh(dense_state)
  with pytest.raises(ConfigError, match="steps"):
    recover(model, {}, iter([]), steps=0)
  params = nnx.state(model, nnx.Param)
  with pytest.raises(ConfigError, match="'model.nope.kernel' names no parameter"):
    mask_tree(params, {"model.nope.kernel": jnp.ones((2, 2), bool)})
  with pytest.raises(ConfigError, match=r"has shape \(2, 2\)"):
    mask_tree(params, {KERNELS[0]: jnp.ones((2, 2), bool)})
  with pytest.raises(ConfigError, match="train.nope"):
    train_config(nope=1)
