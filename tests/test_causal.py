"""Causal LM pretraining: packing, the packed pipeline, the tiny decoder configs
training end to end, resume, and starting from a pretrained checkpoint."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh
from safetensors.numpy import load_file

import jaxlm
from jaxlm import experiment, tasks
from jaxlm.data import pipeline
from jaxlm.data.corpus import prepare_corpus
from jaxlm.data.objectives import causal_example, pack_plan
from jaxlm.errors import ConfigError
from jaxlm.models import auto
from jaxlm.parallel import rules
from jaxlm.train import loop
from jaxlm.train.evaluator import Evaluator

from configs import (bert_tiny, bloom_tiny, command_r, falcon_7b, gemma2_2b, gemma_2b, gpt2_small,
                     llama_1b, mistral_7b, mixtral_8x7b, phi3_mini, qwen2_0_5b)
from conftest import quiet

TINY_DECODERS = {"gpt2_small": gpt2_small, "llama_1b": llama_1b, "mistral_7b": mistral_7b,
                 "bloom_tiny": bloom_tiny, "mixtral_8x7b": mixtral_8x7b, "gemma_2b": gemma_2b,
                 "gemma2_2b": gemma2_2b, "qwen2_0_5b": qwen2_0_5b, "falcon_7b": falcon_7b,
                 "command_r": command_r, "phi3_mini": phi3_mini}
WORDS = "the king queen sword crown night storm ghost blood honour love death".split()


# ---- packing: a packed row computes exactly what the documents compute alone ----------
@pytest.mark.parametrize("name", sorted(TINY_DECODERS))
def test_packed_loss_equals_documents_one_by_one(name):
  cfg = TINY_DECODERS[name].get_config("tiny")
  model = auto.build_model(experiment.model_config(cfg).replace(vocab_size=97),
                           runtime=experiment.runtime(cfg), seed=1)
  graphdef, state = nnx.split(model)
  # Jitted, and every row [1, 64]: few compiles (eager dispatch is slower still).
  stats_fn = jax.jit(lambda b: tasks.get("causal").stats(nnx.merge(graphdef, state), b))

  @jax.jit
  def logits_fn(ids_BT, mask_BT, segment_ids_BT):
    return nnx.merge(graphdef, state)(ids_BT, mask_BT, segment_ids=segment_ids_BT).logits

  rng = np.random.default_rng(0)
  eod = 3
  # Longer than mistral:tiny's 16-token window, so the window is exercised too.
  docs = [np.append(rng.integers(5, 97, n), eod).astype(np.int32) for n in (21, 6, 30)]
  packed = {k: jnp.asarray(v[None]) for k, v in causal_example(docs, max_seq_len=64,
                                                                pad=0).items()}
  stats = stats_fn(packed)
  logits_TV = np.asarray(logits_fn(packed["input_ids"], packed["attention_mask"],
                                   packed["segment_ids"])[0])
  total, count, start = 0.0, 0.0, 0
  for doc in docs:
    alone = {k: jnp.asarray(v[None]) for k, v in causal_example([doc], max_seq_len=64,
                                                                 pad=0).items()}
    s = stats_fn(alone)
    total, count = total + float(s["lm_loss_sum"]), count + float(s["lm_count"])
    # Alone means a plain padded row: no segment ids at all.
    alone_TV = np.asarray(logits_fn(alone["input_ids"], alone["attention_mask"], None)[0])
    np.testing.assert_allclose(logits_TV[start:start + len(doc)], alone_TV[:len(doc)],
                               rtol=1e-5, atol=1e-5, err_msg=name)
    start += len(doc)
  assert float(stats["lm_count"]) == count == sum(len(d) - 1 for d in docs)
  np.testing.assert_allclose(float(stats["lm_loss_sum"]), total, rtol=1e-6)


# ---- the packed pipeline -------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """A generated corpus whose every line carries its document's tag ("doc17.")."""
  src = tmp_path_factory.mktemp("src")
  rng = np.random.default_rng(0)
  for d in range(60):
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) + f" doc{d}."
             for _ in range(rng.integers(1, 12))]
    (src / f"doc{d:02d}.txt").write_text("\n".join(lines))
  cfg = experiment.base_config()
  cfg.data.update(source=str(src), max_seq_len=32)
  cfg.data.clean.min_chars = 10
  cfg.tokenizer.vocab_size = 200
  cfg.train.objective = "causal"
  wd = tmp_path_factory.mktemp("wd")
  return prepare_corpus(cfg.data, cfg.tokenizer, str(wd / "data"), log=quiet), cfg


def test_pack_plan_covers_every_token_once_and_splits_long_documents():
  lengths = np.array([5, 40, 0, 15, 16, 3])
  ends = np.cumsum(lengths)
  starts = ends - lengths
  offsets, pieces = pack_plan(starts, ends, 16, np.random.default_rng(0))
  covered = np.concatenate([np.arange(s, e) for s, e, _ in pieces])
  np.testing.assert_array_equal(np.sort(covered), np.arange(ends[-1]))
  # An end-of-document token at the end of each document, unless it would stand alone
  # in its piece (no target inside its segment): here the 16-token document.
  has_end = (lengths > 0) & (lengths % 16 != 0)
  assert sorted(e for _, e, eod in pieces if eod) == sorted(ends[has_end].tolist())
  for r in range(len(offsets) - 1):
    row = pieces[offsets[r]:offsets[r + 1]]
    assert 0 < (row[:, 1] - row[:, 0] + row[:, 2]).sum() <= 16
  # The 40-token document (+ end token) becomes pieces of 16, 16 and 9.
  long_doc = pieces[(pieces[:, 0] >= starts[1]) & (pieces[:, 1] <= ends[1])]
  assert sorted(long_doc[:, 1] - long_doc[:, 0] + long_doc[:, 2]) == [9, 16, 16]
  again = pack_plan(starts, ends, 16, np.random.default_rng(0))
  np.testing.assert_array_equal(again[1], pieces)


def test_packed_rows_segments_positions_targets(small):
  c, cfg = small
  tok = c.tokenizer
  eod = pipeline.end_of_document_id(tok)
  it = tasks.get("causal").train_iterator(c, cfg.data, batch_size=64, seed=0)
  batch = next(it)
  assert batch["input_ids"].shape == (64, 32)
  assert batch["attention_mask"].mean() > 0.8  # packing leaves little padding
  multi = 0
  for ids, seg, pos, tgt, w, attn in zip(*(batch[k] for k in (
      "input_ids", "segment_ids", "position_ids", "targets", "loss_weights",
      "attention_mask"))):
    n = int(attn.sum())
    assert (seg[:n] > 0).all() and (seg[n:] == 0).all() and (ids[n:] == tok.pad_id).all()
    assert seg[0] == 1 and set(np.diff(seg[:n])) <= {0, 1}  # 1, 2, ... per document
    multi += seg.max() > 1
    for s in range(1, seg.max() + 1):
      where = np.flatnonzero(seg == s)
      np.testing.assert_array_equal(pos[where], np.arange(len(where)))  # restart
      np.testing.assert_array_equal(tgt[where[:-1]], ids[where[1:]])  # next token
      assert (w[where[:-1]] == 1).all() and w[where[-1]] == 0  # never across documents
      text = tok.decode(ids[where].tolist())
      assert len({x for x in text.replace(".", " ").split() if x.startswith("doc")}) <= 1
      if s < seg.max():
        assert ids[where[-1]] == eod  # a document packed before another has ended
    assert (w[n:] == 0).all() and (pos[n:] == 0).all()
  assert multi >= 5


def test_causal_iterator_state_resumes_exactly(small):
  c, cfg = small
  it = tasks.get("causal").train_iterator(c, cfg.data, batch_size=8, seed=3)
  for _ in range(12):  # past the end of the first epoch: reshuffled rows
    next(it)
  state = it.get_state()
  json.dumps(state)
  expected = [next(it) for _ in range(3)]
  it2 = tasks.get("causal").train_iterator(c, cfg.data, batch_size=8, seed=3)
  it2.set_state(state)
  for want in expected:
    got = next(it2)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  other = next(tasks.get("causal").train_iterator(c, cfg.data, batch_size=8, seed=4))
  assert not np.array_equal(other["input_ids"], expected[0]["input_ids"])


def test_causal_eval_batches_cover_the_split(small):
  c, cfg = small
  s = c.splits["validation"]
  n = len(tasks.get("causal").examples(c, "validation", cfg.data, 0).source)
  batches = list(tasks.get("causal").eval_batches(c, "validation", cfg.data,
                                       batch_size=3, seed=1))
  assert sum(b["example_weight"].sum() for b in batches) == n
  real = sum(float((b["attention_mask"] * b["example_weight"][:, None]).sum()) for b in batches)
  doc_lengths = np.diff(s.line_offsets[s.doc_lines])
  # Every token once, plus an end token per document (but never one left alone in a row).
  assert real == s.num_tokens + ((doc_lengths > 0) & (doc_lengths % 32 != 0)).sum()
  logp = pipeline.causal_unigram_log_probs(c)
  np.testing.assert_allclose(np.exp(logp).sum(), 1.0, rtol=1e-9)


# ---- config checks -----------------------------------------------------------------------
def test_objective_must_fit_the_model_class():
  cfg = gpt2_small.get_config("tiny")
  cfg.train.objective = "mlm+nsp"
  with pytest.raises(ConfigError, match="train.objective"):
    experiment.validate(cfg)
  cfg = bert_tiny.get_config("tiny")
  cfg.train.objective = "causal"
  with pytest.raises(ConfigError, match="train.objective"):
    experiment.validate(cfg)
  cfg = llama_1b.get_config("tiny")
  cfg.model.causal = False
  with pytest.raises(ConfigError, match="model.causal"):
    experiment.validate(cfg)


@pytest.mark.parametrize("name", sorted(TINY_DECODERS))
def test_full_size_configs_validate_and_build_abstractly(name):
  cfg = TINY_DECODERS[name].get_config()
  model_cfg = experiment.validate(cfg).replace(vocab_size=cfg.tokenizer.vocab_size)
  model = auto.build_abstract_model(model_cfg)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  expected = {"gpt2_small": 92e6, "llama_1b": 0.99e9, "mistral_7b": 7.05e9,
              "bloom_tiny": 5.3e6,  # with an 8192-token vocabulary
              "mixtral_8x7b": 46.5078e9,  # 46,702,792,704 with its 32000 tokens
              # 2,506,172,416 and 2,614,341,888 with Gemma's 256000 tokens
              "gemma_2b": 1.9987e9, "gemma2_2b": 2.0434e9,
              # 494,032,768 with Qwen2's 151936 tokens, transformers' num_parameters();
              # 6,921,720,704 with Falcon's 65024 tokens; 34,980,831,232 with Command-R's
              # 256000; 3,821,079,552 with Phi-3's 32064
              "qwen2_0_5b": 365.238e6, "falcon_7b": 6.6635e9, "command_r": 32.9508e9,
              "phi3_mini": 3.6744e9}[name]
  assert abs(n / expected - 1) < 0.01, n
  # The mesh rules reach every family's weights: on an FSDP x tensor mesh, each matrix of a
  # million entries or more is split (the norms and biases stay replicated).
  mesh = AbstractMesh((4, 2, 2), ("fsdp", "tensor", "expert"))
  state = nnx.state(model, nnx.Param)
  shardings = jax.tree.leaves(rules.state_shardings(state, mesh, rules.DEFAULT_RULES))
  for (path, var), sharding in zip(nnx.to_flat_state(state), shardings, strict=True):
    if var.get_value().size >= 1 << 20:
      assert sharding.num_devices == 16 and not sharding.is_fully_replicated, path


# ---- training end to end -----------------------------------------------------------------
def val_loss_at_init(cfg, workdir) -> float:
  corpus, model, task = loop.setup(cfg, str(workdir))
  graphdef, params = nnx.split(model, nnx.Param)
  evaluator = Evaluator(corpus, cfg, graphdef, task, model.config.vocab_size)
  return evaluator(params, "validation")["loss"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_corpus):
  """Each tiny decoder config trained once: {name: (workdir, val loss at init, report)}."""
  out = {}
  for name, mod in TINY_DECODERS.items():
    wd = tmp_path_factory.mktemp(name)
    shutil.copytree(tiny_corpus, wd / "data")
    cfg = mod.get_config("tiny")
    before = val_loss_at_init(cfg, wd)
    out[name] = (wd, before, loop.train(cfg, str(wd)))
  return out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY_DECODERS))
def test_tiny_decoder_training_lowers_val_loss(trained, name):
  wd, before, rep = trained[name]
  assert rep["val_loss"] < before - 0.5, (before, rep["val_loss"])
  assert abs(before - np.log(rep["corpus"]["vocab_size"])) < 0.5  # init: near uniform
  for key in ("val_loss", "val_perplexity", "unigram_perplexity", "params", "tokens_seen",
              "test_loss", "test_perplexity", "val_accuracy"):
    assert rep[key] is not None, key
  np.testing.assert_allclose(rep["val_perplexity"], np.exp(rep["val_loss"]), rtol=1e-9)
  assert rep["tokens_seen"] > 0.9 * 80 * 16 * 64  # rows are packed full
  assert len(rep["samples"]) == 2 and "fill_mask" not in rep
  saved = json.loads((wd / "report.json").read_text())
  assert saved["val_loss"] == rep["val_loss"]
  rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "val_loss" in r] == [40, 80]
  assert {"loss", "accuracy", "tokens_per_s", "mfu"} <= set(rows[0])
  # Model FLOPs utilization against this CPU's measured matmul peak.
  assert all(0.0 < r["mfu"] < 1.0 for r in rows if "mfu" in r), [r.get("mfu") for r in rows]


@pytest.mark.slow
def test_tiny_mixtral_routes_evenly_and_logs_router_balance(trained):
  wd, _, rep = trained["mixtral_8x7b"]
  E = 4
  rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "expert_fraction_min" in r]
  assert len(train_rows) == 4  # every logged training step reports the router
  last = train_rows[-1]
  # By the end each expert gets between half and twice its fair share of token slots,
  # in every layer (the min/max run over layers and experts).
  assert 0.5 / E <= last["expert_fraction_min"] <= last["expert_fraction_max"] <= 2 / E, last
  np.testing.assert_allclose(sum(last[f"expert_fraction_{e}"] for e in range(E)), 1.0,
                             rtol=1e-5)
  assert last["router_aux_loss"] >= 1.0 - 1e-3  # E * sum f_e P_e >= 1, = 1 when balanced
  assert rep["params"] > 0


@pytest.mark.slow
def test_causal_resume_from_checkpoint_is_exact(trained, tmp_path, capsys):
  src = trained["llama_1b"][0]
  wd = tmp_path / "resumed"
  shutil.copytree(src, wd)
  shutil.rmtree(wd / "checkpoints" / "80")  # as if killed between steps 40 and 80
  shutil.rmtree(wd / "model")
  cfg = llama_1b.get_config("tiny")
  cfg.eval.samples = 0  # not part of the training state; saves a compile
  capsys.readouterr()
  rep = loop.train(cfg, str(wd))
  # It resumed from the step-40 checkpoint (a run that ignored it would also reach the same
  # numbers: training is deterministic).
  assert f"resuming from checkpoint at step 40 in {wd}" in capsys.readouterr().err
  assert rep["steps"] == 80 and rep["val_loss"] == trained["llama_1b"][2]["val_loss"]
  a = load_file(str(src / "model/model.safetensors"))
  b = load_file(str(wd / "model/model.safetensors"))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # --mode=eval reads the final checkpoint back and reproduces the report's numbers.
  out = loop.evaluate(cfg, str(wd))
  np.testing.assert_allclose(out["val_loss"], rep["val_loss"], rtol=1e-6)
  np.testing.assert_allclose(out["test_perplexity"], rep["test_perplexity"], rtol=1e-6)


@pytest.mark.slow
def test_training_from_a_pretrained_checkpoint(trained, tmp_path):
  src_wd, _, src_rep = trained["gpt2_small"]
  pretrained = src_wd / "model"  # the export: model + tokenizer
  cfg = gpt2_small.get_config("tiny")
  cfg.model.init_from = str(pretrained)
  cfg.train.update(steps=10, eval_every=10, warmup_steps=2, learning_rate=1e-3)
  cfg.eval.samples = 0
  wd = tmp_path / "from_pretrained"
  before = val_loss_at_init(cfg, wd)
  # The same weights and tokenizer: the source run's final validation loss.
  np.testing.assert_allclose(before, src_rep["val_loss"], rtol=1e-5)
  rep = loop.train(cfg, str(wd))
  assert rep["val_loss"] < before
  assert (wd / "model" / "config.json").exists()


def test_init_from_conflicts_name_the_key(tmp_path):
  cfg = gpt2_small.get_config("tiny")
  model_cfg = experiment.model_config(cfg).replace(vocab_size=64)
  pretrained = tmp_path / "pretrained"
  jaxlm.save_pretrained(auto.build_model(model_cfg), str(pretrained))
  cfg.model.init_from = str(pretrained)
  cfg.train.objective = "mlm"
  with pytest.raises(ConfigError, match="train.objective"):
    experiment.validate(cfg)
  cfg.train.objective = "causal"
  cfg.model.hidden_size = 128
  with pytest.raises(ConfigError, match="model.hidden_size"):
    experiment.pretrained_model_config(cfg, jaxlm.from_pretrained(str(pretrained)).config)
  cfg.model.hidden_size = 64
  cfg.model.hidden_dropout_prob = 0.2  # a training choice, not architecture: allowed
  got = experiment.pretrained_model_config(cfg, jaxlm.from_pretrained(str(pretrained)).config)
  assert got.hidden_dropout_prob == 0.2 and got.vocab_size == 64
  cfg.tokenizer.path = str(tmp_path)
  with pytest.raises(ConfigError, match="tokenizer.path"):
    experiment.validate(cfg)
