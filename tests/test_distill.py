"""Distillation (train.objective=distill): the chunked KL against dense logits, the
frozen teacher (no gradients, no optimizer state, unchanged by training), the student
from every other teacher layer, both configs end to end (decoder from a jaxlm export,
MLM encoder), a Hugging Face teacher, and the one-line errors for bad input."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import fixture, quiet
from flax import nnx

from configs import distill_bert, distill_gpt2
from jaxlm import experiment
from jaxlm.config import ModelConfig
from jaxlm.data.corpus import load_corpus
from jaxlm.data.tokenizer import Tokenizer, train_tokenizer
from jaxlm.errors import ConfigError
from jaxlm.layers.vocab_loss import Projection
from jaxlm.models import auto
from jaxlm.params import flat_params
from jaxlm.pretrained import from_pretrained, save_pretrained
from jaxlm.tasks import distill
from jaxlm.train import loop
from jaxlm.train.steps import make_train_step

V = 97  # vocabulary of the in-process models


def gpt_config(vocab: int, layers: int, hidden: int = 64, **kw) -> ModelConfig:
  """distill_gpt2.py:tiny's student shape, with `layers` layers."""
  return ModelConfig(model_type="gpt2", architectures=["GPT2LMHeadModel"], causal=True,
                     vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=4, intermediate_size=4 * hidden,
                     max_position_embeddings=64, hidden_act="gelu_new", norm_position="pre",
                     layer_norm_eps=1e-5, type_vocab_size=0, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, **kw)


def bert_config(vocab: int, layers: int) -> ModelConfig:
  """distill_bert.py:tiny's student shape (rotary, 32 wide), with `layers` layers."""
  return ModelConfig(architectures=["BertForPreTraining"], vocab_size=vocab, hidden_size=32,
                     num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64, position_embedding_type="rope",
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def tok(tiny_corpus):
  return load_corpus(str(tiny_corpus)).tokenizer


@pytest.fixture(scope="module")
def gpt_teacher(tmp_path_factory, tok):
  """A 2-layer GPT-2 export (random weights) with the tiny corpus's tokenizer."""
  d = tmp_path_factory.mktemp("gpt_teacher") / "model"
  cfg = gpt_config(tok.vocab_size, 2, pad_token_id=tok.pad_id, eos_token_id=tok.sep_id)
  save_pretrained(auto.build_model(cfg, seed=1), str(d))
  tok.save(str(d))
  return d


@pytest.fixture(scope="module")
def bert_teacher(tmp_path_factory, tok):
  """A 2-layer rotary BERT (a jaxlm export) with the tiny corpus's tokenizer."""
  d = tmp_path_factory.mktemp("bert_teacher") / "model"
  save_pretrained(auto.build_model(bert_config(tok.vocab_size, 2), seed=2), str(d))
  tok.save(str(d))
  return d


# ---- the fused KL ----------------------------------------------------------------------
def _dense_kl(hs, ws, bs, ht, wt, bt, w, temp):
  ls = jax.nn.log_softmax((hs @ ws.T + bs) / temp)  # student: [V, D] table with a bias
  lt = jax.nn.log_softmax((ht @ wt + bt) / temp)  # teacher: [D, V] kernel, wider
  return ((jnp.exp(lt) * (lt - ls)).sum(-1) * w).sum()


@pytest.mark.parametrize("chunk_logits", [distill.CHUNK_LOGITS, 8])
def test_kl_sum_matches_dense_logits_and_gradients(monkeypatch, chunk_logits):
  monkeypatch.setattr(distill, "CHUNK_LOGITS", chunk_logits)  # 8: one position a chunk
  k = jax.random.split(jax.random.key(0), 7)
  B, T, Ds, Dt = 2, 7, 5, 6
  hs, ws, bs = (jax.random.normal(k[0], (B, T, Ds)), jax.random.normal(k[1], (V, Ds)),
                jax.random.normal(k[2], (V,)))
  ht, wt, bt = (jax.random.normal(k[3], (B, T, Dt)), jax.random.normal(k[4], (Dt, V)),
                jax.random.normal(k[5], (V,)))
  w = (jax.random.uniform(k[6], (B, T)) > 0.3).astype(jnp.float32)

  def fused(hs, ws, bs):
    return distill.kl_sum(Projection(hs, ws, bs), Projection(ht, wt, bt, vocab_major=False),
                          w, 2.0)

  want = _dense_kl(hs, ws, bs, ht, wt, bt, w, 2.0)
  assert float(want) > 1.0
  np.testing.assert_allclose(jax.jit(fused)(hs, ws, bs), want, rtol=1e-5)
  got_g = jax.jit(jax.grad(fused, argnums=(0, 1, 2)))(hs, ws, bs)
  want_g = jax.jit(jax.grad(_dense_kl, argnums=(0, 1, 2)), static_argnums=7)(
      hs, ws, bs, ht, wt, bt, w, 2.0)
  for got, ref in zip(got_g, want_g):
    np.testing.assert_allclose(got, ref, atol=2e-6)
  # The same distribution (rescaled logits are not the same): zero KL, zero gradient.
  same = distill.kl_sum(Projection(hs, ws, bs), Projection(hs, ws, bs), w, 3.0)
  assert abs(float(same)) < 1e-5


def test_cosine_sum_is_one_minus_cosine_where_weighted():
  hs = jnp.asarray([[[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]]])
  ht = jnp.asarray([[[0.0, 2.0], [2.0, 2.0], [-3.0, -4.0]]])
  w = jnp.asarray([[1.0, 1.0, 0.5]])
  np.testing.assert_allclose(distill.cosine_sum(hs, ht, w), 1.0 + 0.0 + 0.5 * 2.0, rtol=1e-6)


# ---- the frozen teacher -------------------------------------------------------------------
def _batches(n: int, B: int = 4, T: int = 16):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    ids = rng.integers(5, V, (B, T + 1)).astype(np.int32)
    out.append({"input_ids": ids[:, :-1], "targets": ids[:, 1:],
                "attention_mask": np.ones((B, T), np.int32),
                "segment_ids": np.ones((B, T), np.int32),
                "position_ids": np.tile(np.arange(T), (B, 1)).astype(np.int32),
                "loss_weights": np.ones((B, T), np.float32)})
  return out


def test_only_the_student_trains_and_its_kl_to_the_teacher_falls():
  teacher = auto.build_model(gpt_config(V, 2, hidden=32), seed=1)
  # A confident teacher (sharp distributions) that a random student is far from.
  emb = teacher.model.embed.embedding
  emb.set_value(emb.get_value() * 40.0)
  student = auto.build_model(gpt_config(V, 1, hidden=16), seed=2)
  task = distill.Distill("causal", temperature=2.0, alpha_kl=1.0, alpha_hard=0.5)
  model = distill.Distiller(student, teacher)
  graphdef, params, frozen = nnx.split(model, task.trainable(model), ...)
  assert all(p[0] == "student" for p, _ in nnx.to_flat_state(params))
  assert {p[0] for p, _ in nnx.to_flat_state(frozen)} == {"teacher"}
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  n_params = len(jax.tree.leaves(params))
  # Adam's two moments per trained parameter and a step count: nothing for the teacher.
  assert len(jax.tree.leaves(opt_state)) == 2 * n_params + 1
  teacher_before = flat_params(teacher)
  batches = _batches(9)
  held_out = batches.pop()

  # The step's loss is alpha_hard * NLL + alpha_kl * T^2 * KL, from dense logits.
  s_logits, t_logits = jax.jit(lambda ids: (student(ids).logits, teacher(ids).logits))(
      held_out["input_ids"])
  nll = -jnp.take_along_axis(jax.nn.log_softmax(s_logits), held_out["targets"][..., None],
                             -1).mean()
  lt, ls = jax.nn.log_softmax(t_logits / 2.0), jax.nn.log_softmax(s_logits / 2.0)
  kl = (jnp.exp(lt) * (lt - ls)).sum(-1).mean()
  stats_fn = jax.jit(lambda p, f, b: task.stats(nnx.merge(graphdef, p, f), b))
  stats = stats_fn(params, frozen, held_out)
  np.testing.assert_allclose(task.loss(stats), 0.5 * nll + 4.0 * kl, rtol=1e-4)
  kl_before = float(stats["kd_kl_sum"] / stats["lm_count"])
  assert kl_before > 0.5

  step = make_train_step(graphdef, tx, task, seed=0, dropout=False)
  for i in range(30):
    params, opt_state, m = step(params, opt_state, batches[i % len(batches)], i, frozen)
  assert float(m["kd_kl_sum"] / m["lm_count"]) < kl_before  # a training batch's
  stats = stats_fn(params, frozen, held_out)
  kl_after = float(stats["kd_kl_sum"] / stats["lm_count"])
  assert kl_after < 0.7 * kl_before, (kl_before, kl_after)  # measured: 4.40 -> 2.61
  after = flat_params(nnx.merge(graphdef, params, frozen).teacher)
  assert all(np.array_equal(after[k], v) for k, v in teacher_before.items())


def test_student_starts_from_every_other_teacher_layer():
  teacher = auto.build_model(gpt_config(V, 4), seed=1)
  student = auto.build_model(gpt_config(V, 2), seed=2)
  info = distill.init_from_teacher_layers(student, teacher, "teacher", quiet)
  assert info["kept"] == []
  s, t = flat_params(student), flat_params(teacher)
  for name, value in s.items():
    src = name.replace("layers.1.", "layers.2.")
    np.testing.assert_array_equal(value, t[src])
  assert not np.array_equal(s["model.layers.1.attn.q.kernel"], t["model.layers.1.attn.q.kernel"])
  wide = auto.build_model(gpt_config(V, 2, hidden=32), seed=2)
  with pytest.raises(ConfigError, match=r"distill.init_from_teacher_layers: teacher tensor "
                                        r"'model.embed.embedding' has shape \(97, 64\)"):
    distill.init_from_teacher_layers(wide, teacher, "teacher", quiet)


# ---- end to end ---------------------------------------------------------------------------
@pytest.mark.slow
def test_distill_gpt2_tiny_exports_the_student_with_the_teachers_tokenizer(
    tmp_path, gpt_teacher, tok):
  cfg = distill_gpt2.get_config("tiny")
  cfg.distill.teacher = str(gpt_teacher.parent)  # a workdir: its model/ is read
  cfg.eval.samples = 0
  wd = tmp_path / "run"
  rep = loop.train(cfg, str(wd))
  student = from_pretrained(str(wd / "model"))
  assert json.loads((wd / "model" / "config.json").read_text())["n_layer"] == 1  # HF format
  assert student.config.vocab_size == tok.vocab_size
  assert distill.tokenizer_difference(Tokenizer.load(str(wd / "model")), tok) == ""
  n_student = sum(x.size for x in flat_params(student).values())
  assert rep["params"] == rep["trained_params"] == n_student
  # The student began as teacher layer 0 with the teacher's embeddings, and trained.
  teacher = from_pretrained(str(gpt_teacher))
  moved = np.abs(flat_params(student)["model.embed.embedding"]
                 - flat_params(teacher)["model.embed.embedding"]).max()
  assert 0 < moved < 0.5
  rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [x["step"] for x in rows if "val_kl" in x] == [10, 20]
  assert all(x["kl"] >= 0 and x["hard_loss"] > 0 for x in rows if "kl" in x)
  # The reported validation KL and NLL, recomputed from dense logits of the exports.
  corpus = load_corpus(str(wd / "data"))
  task = experiment.task_of(cfg)
  kl = nll = n = 0.0
  for b in task.eval_batches(corpus, "validation", cfg.data, batch_size=cfg.eval.batch_size,
                             seed=cfg.seed + 1, max_batches=cfg.eval.max_batches):
    kw = {"segment_ids": b["segment_ids"], "position_ids": b["position_ids"]}
    zs = student(b["input_ids"], b["attention_mask"], **kw).logits
    lt = jax.nn.log_softmax(teacher(b["input_ids"], b["attention_mask"], **kw).logits / 2.0)
    w = b["loss_weights"] * b["example_weight"][:, None]
    ls = jax.nn.log_softmax(zs)
    nll -= float((jnp.take_along_axis(ls, b["targets"][..., None], -1)[..., 0] * w).sum())
    ls_t = jax.nn.log_softmax(zs / 2.0)
    kl += float(((jnp.exp(lt) * (lt - ls_t)).sum(-1) * w).sum())
    n += float(w.sum())
  assert rep["val_kl"] == pytest.approx(kl / n, rel=1e-4) and rep["val_kl"] > 0
  assert rep["val_loss"] == pytest.approx(nll / n, rel=1e-5)
  assert rep["test_kl"] > 0
  # A resumed run reloads the teacher and continues from the student's checkpoint.
  cfg.train.steps = 25
  assert loop.train(cfg, str(wd))["steps"] == 25


@pytest.mark.slow
def test_distill_bert_tiny_trains_mlm_with_kl_and_cosine(tmp_path, bert_teacher, tok):
  cfg = distill_bert.get_config("tiny")
  cfg.distill.teacher = str(bert_teacher)
  wd = tmp_path / "run"
  rep = loop.train(cfg, str(wd))
  student = from_pretrained(str(wd / "model"))
  assert type(student).__name__ == "BertForMaskedLM"
  assert student.config.num_hidden_layers == 1
  for key in ("val_mlm_perplexity", "val_kl", "val_cosine_loss", "test_kl"):
    assert np.isfinite(rep[key]) and rep[key] > 0, key
  assert rep["val_loss"] == rep["val_mlm_loss"]
  assert rep["fill_mask"]


def _texts(tiny_corpus, n: int = 60) -> list[str]:
  with open(tiny_corpus / "train.jsonl", encoding="utf-8") as f:
    return [json.loads(line)["text"] for line, _ in zip(f, range(n))]


@pytest.mark.slow
def test_a_hugging_face_teacher_through_setup(tmp_path, tiny_corpus):
  """tests/fixtures/hf/gpt2 (a transformers checkpoint) with a 256-token tokenizer beside
  it: the student gets its vocabulary, starts as its layer 0, and the KL is finite."""
  teacher_dir = tmp_path / "gpt2"
  shutil.copytree(fixture("gpt2"), teacher_dir)
  train_tokenizer(_texts(tiny_corpus), vocab_size=256).save(str(teacher_dir))
  cfg = distill_gpt2.get_config("tiny")
  cfg.model.update(hidden_size=32, intermediate_size=128)
  cfg.distill.teacher = str(teacher_dir)
  cfg.data.max_seq_len = 32
  corpus, model, task = loop.setup(cfg, str(tmp_path / "run"))
  assert corpus.tokenizer.vocab_size == 256 and model.student.config.vocab_size == 256
  hf = flat_params(model.teacher)
  np.testing.assert_array_equal(flat_params(model.student)["model.layers.0.mlp.up.kernel"],
                                hf["model.layers.0.mlp.up.kernel"])
  batch = next(iter(task.eval_batches(corpus, "validation", cfg.data, batch_size=4, seed=0)))
  graphdef, state = nnx.split(model)
  stats = jax.jit(lambda st, b: task.stats(nnx.merge(graphdef, st), b))(state, batch)
  assert np.isfinite(float(stats["kd_kl_sum"])) and float(stats["kd_kl_sum"]) > 0


# ---- bad input ----------------------------------------------------------------------------
def _cfg(teacher, **distill_keys):
  cfg = distill_gpt2.get_config("tiny")
  cfg.distill.teacher = str(teacher)
  cfg.distill.update(distill_keys)
  return cfg


def _raises(cfg, pattern):
  with pytest.raises(ConfigError, match=pattern) as e:
    experiment.validate(cfg)
  assert "\n" not in str(e.value)


def test_missing_or_empty_teacher_is_one_line(tmp_path):
  _raises(_cfg(tmp_path / "nowhere"), r"distill.teacher: no such directory: '.*nowhere'")
  _raises(_cfg(""), "distill.teacher: name the teacher")
  _raises(_cfg(tmp_path), "distill.teacher: .* has no config.json")


def test_different_tokenizers_are_refused(tmp_path, gpt_teacher, tok, tiny_corpus):
  cfg = _cfg(gpt_teacher)
  experiment.validate(cfg)  # the teacher's own tokenizer: fine
  cfg.tokenizer.path = str(gpt_teacher)
  experiment.validate(cfg)
  other = tmp_path / "other"
  train_tokenizer(_texts(tiny_corpus), vocab_size=256).save(str(other))
  cfg.tokenizer.path = str(other)
  _raises(cfg, rf"tokenizer.path: the student's tokenizer .* differs from the teacher's .*: "
               rf"vocab sizes 256 and {tok.vocab_size}")
  # Same size, one token changed: the files differ.
  spec = json.loads((gpt_teacher / "tokenizer.json").read_text())
  vocab = spec["model"]["vocab"]
  word = next(w for w, i in vocab.items() if i == 200)
  vocab["zzzzqq"] = vocab.pop(word)
  same_size = tmp_path / "same_size"
  same_size.mkdir()
  (same_size / "tokenizer.json").write_text(json.dumps(spec))
  cfg.tokenizer.path = str(same_size)
  _raises(cfg, r"differs from the teacher's .*: id 200 is 'zzzzqq' in one and")
  # A student from model.init_from with another vocabulary.
  cfg = _cfg(gpt_teacher)
  student = tmp_path / "student"
  save_pretrained(auto.build_model(gpt_config(256, 1)), str(student))
  Tokenizer.load(str(other)).save(str(student))
  cfg.model.init_from = str(student)
  _raises(cfg, "model.init_from: the student's tokenizer .* vocab sizes 256 and")
  cfg = _cfg(gpt_teacher)
  cfg.model.vocab_size = 512
  _raises(cfg, rf"model.vocab_size: the student \(model\) has 512 tokens, the teacher .* "
               rf"{tok.vocab_size}")


@pytest.mark.parametrize("keys,pattern", [
    ({"temperature": 0.0}, r"distill.temperature must be in \(0, inf\)"),
    ({"alpha_kl": -1.0}, r"distill.alpha_kl must be in \[0, inf\)"),
    ({"alpha_kl": 0.0}, "distill.alpha_kl and distill.alpha_cos are both 0"),
    ({"alpha_cos": 1.0}, "distill.alpha_cos: .* hidden_size is 32 and the teacher's 64"),
    ({"alpha_hard": -0.5}, r"distill.alpha_hard must be in \[0, inf\)"),
])
def test_bad_distill_keys_are_one_line(gpt_teacher, keys, pattern):
  cfg = _cfg(gpt_teacher, **keys)
  if "alpha_cos" in keys:
    cfg.distill.init_from_teacher_layers = False
    cfg.model.update(hidden_size=32, intermediate_size=128)
  _raises(cfg, pattern)


def test_bad_teacher_student_pairs_are_one_line(gpt_teacher, bert_teacher):
  cfg = _cfg(gpt_teacher)
  cfg.model.num_hidden_layers = 2  # teacher layers 0 and 2 of a 2-layer teacher
  _raises(cfg, "distill.init_from_teacher_layers: a 2-layer student takes teacher layers "
               "0, 2, but .* has 2")
  cfg = _cfg(gpt_teacher)
  cfg.model.intermediate_size = 128
  _raises(cfg, "distill.init_from_teacher_layers: model.intermediate_size is 128, the "
               "teacher's 256")
  _raises(_cfg(bert_teacher), r"distill.teacher: .* is a BertForPreTraining, but the student "
                              r"is a decoder-only \(causal\) LM")
  cfg = distill_bert.get_config("tiny")
  cfg.distill.teacher = str(gpt_teacher)
  _raises(cfg, "distill.teacher: .* is a GPT2LMHeadModel, but the student is a masked-LM "
               "encoder")
  cfg = _cfg(gpt_teacher)
  cfg.data.max_seq_len = 128
  cfg.model.max_position_embeddings = 128
  cfg.distill.init_from_teacher_layers = False
  _raises(cfg, r"data.max_seq_len \(128\) exceeds max_position_embeddings of "
               r"distill.teacher=.* \(64\)")
  no_tok = _cfg(fixture("gpt2"))
  no_tok.model.update(hidden_size=32, intermediate_size=128)
  _raises(no_tok, "distill.teacher: .*no tokenizer.json")
