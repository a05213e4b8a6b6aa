"""The contrastive retriever: ranking metrics, inverse-cloze pairs, the InfoNCE loss, that
the trained embedding is the one DenseRetriever computes, training end to end with
--mode=eval's eval.json, and the one-line errors for bad input."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import quiet
from flax import nnx

from configs import retriever
from jaxlm import experiment
from jaxlm.config import ModelConfig
from jaxlm.data import ict
from jaxlm.data.corpus import load_corpus
from jaxlm.errors import ConfigError
from jaxlm.evals.retrieval import mrr_at_k, ndcg_at_k, recall_at_k, retrieval_metrics
from jaxlm.models import auto
from jaxlm.pretrained import from_pretrained, save_pretrained
from jaxlm.retrieval import BM25Retriever, DenseRetriever
from jaxlm.tasks import contrastive
from jaxlm.train import loop

L = 64  # data.max_seq_len of the :tiny runs


def _cfg(arg="tiny", **sections):
  cfg = retriever.get_config(arg)
  for section, values in sections.items():
    for key, value in values.items():
      cfg[section][key] = value
  return cfg


def _task(**contrastive_keys):
  return experiment.task_of(_cfg(contrastive=contrastive_keys))


@pytest.fixture(scope="module")
def corpus(tiny_corpus):
  return load_corpus(str(tiny_corpus))


@pytest.fixture(scope="module")
def bert_export(tmp_path_factory, corpus):
  """A tiny random BertForPreTraining export (configs/retriever.py:tiny's shape) with the
  tiny corpus's tokenizer: the `model.init_from` of the end-to-end run."""
  d = tmp_path_factory.mktemp("mlm") / "model"
  cfg = ModelConfig(architectures=["BertForPreTraining"], vocab_size=corpus.tokenizer.vocab_size,
                    hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=64,
                    position_embedding_type="rope", hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
  save_pretrained(auto.build_model(cfg, seed=5), str(d))
  corpus.tokenizer.save(str(d))
  return d


# ---- metrics ---------------------------------------------------------------------------
def test_metrics_match_hand_computed_values():
  ids = np.array([[3, 1, 2], [0, 5, 6], [7, 8, 9]])
  rel = np.array([1, 6, 4])
  assert recall_at_k(ids, rel, 1) == 0.0
  assert recall_at_k(ids, rel, 3) == pytest.approx(2 / 3)
  assert mrr_at_k(ids, rel, 3) == pytest.approx((1 / 2 + 1 / 3) / 3)
  assert ndcg_at_k(ids, rel, 3) == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 3)
  # Several relevant ids, padding (-1) and a repeated id: each relevant id counts once.
  ids = np.array([[1, 2, 2, 4, -1]])
  rel = [{2, 4, 9}]
  assert recall_at_k(ids, rel, 5) == pytest.approx(2 / 3)
  assert mrr_at_k(ids, rel, 5) == pytest.approx(1 / 2)
  ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)
  assert ndcg_at_k(ids, rel, 5) == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / ideal)
  assert retrieval_metrics(ids, rel, recall_ks=(1, 5), rank_k=5) == {
      "recall@1": 0.0, "recall@5": pytest.approx(2 / 3), "mrr@5": 0.5,
      "ndcg@5": pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / ideal)}


def test_metrics_agree_with_a_plain_loop_on_random_rankings():
  rng = np.random.default_rng(0)
  ids = np.stack([rng.permutation(30)[:10] for _ in range(50)])
  rel = [set(rng.choice(30, size=rng.integers(1, 4), replace=False).tolist()) for _ in range(50)]
  want_r5, want_mrr, want_ndcg = [], [], []
  for row, r in zip(ids.tolist(), rel):
    want_r5.append(len(r & set(row[:5])) / len(r))
    ranks = [i + 1 for i, x in enumerate(row) if x in r]
    want_mrr.append(1 / ranks[0] if ranks else 0.0)
    dcg = sum(1 / math.log2(k + 1) for k in ranks)
    want_ndcg.append(dcg / sum(1 / math.log2(k + 1) for k in range(1, min(len(r), 10) + 1)))
  assert recall_at_k(ids, rel, 5) == pytest.approx(np.mean(want_r5))
  assert mrr_at_k(ids, rel, 10) == pytest.approx(np.mean(want_mrr))
  assert ndcg_at_k(ids, rel, 10) == pytest.approx(np.mean(want_ndcg))


def test_metrics_reject_bad_shapes():
  with pytest.raises(ConfigError, match="k=11 must be in"):
    recall_at_k(np.zeros((2, 10), int), np.array([0, 1]), 11)
  with pytest.raises(ConfigError, match="3 entries for 2 ranked queries"):
    recall_at_k(np.zeros((2, 10), int), np.array([0, 1, 2]), 5)
  with pytest.raises(ConfigError, match=r"must be \[Q, K\]"):
    recall_at_k(np.zeros(10, int), np.array([0]), 5)


# ---- inverse-cloze pairs ----------------------------------------------------------------
def test_eval_pairs_remove_the_query_line_and_match_their_texts(corpus):
  s, tok = corpus.splits["test"], corpus.tokenizer
  rows = ict.eval_rows(s, L - 2, 6, seed=0)
  assert len(rows) > 100
  np.testing.assert_array_equal(rows, ict.eval_rows(s, L - 2, 6, seed=0))
  assert (rows[:, 3] != ict.eval_rows(s, L - 2, 6, seed=1)[:, 3]).any()
  doc_of_line = np.searchsorted(s.doc_lines, np.arange(s.line_offsets.size - 1), "right") - 1
  fn = ict.IctPairs(s, tok, max_seq_len=L, query_max_len=32, min_query_tokens=6)
  queries, passages = ict.eval_texts(corpus, "test", rows)
  for i in range(0, len(rows), 37):
    doc, first, end, q = (int(x) for x in rows[i])
    assert first <= q < end and end - first >= 2 and s.line_offsets[q + 1] - s.line_offsets[q] >= 6
    assert doc_of_line[first] == doc_of_line[end - 1] == doc  # one document
    ex = fn(rows[i])
    line = s.line(q).tolist()
    rest = np.concatenate([s.tokens[s.line_offsets[first]:s.line_offsets[q]],
                           s.tokens[s.line_offsets[q + 1]:s.line_offsets[end]]]).tolist()
    n, nq = int(ex["attention_mask"].sum()), int(ex["query_attention_mask"].sum())
    assert ex["input_ids"][:n].tolist() == [tok.cls_id, *rest, tok.sep_id]
    assert ex["query_input_ids"][:nq].tolist() == [tok.cls_id, *line, tok.sep_id]
    assert ex["input_ids"].shape == (L,) and ex["query_input_ids"].shape == (32,)
    # The texts the retrievers see tokenize to the same ids.
    assert tok.encode(queries[i]) == line and tok.encode(passages[i]) == rest


def test_training_pairs_draw_query_lines_and_keep_some(corpus):
  s = corpus.splits["train"]
  rows = ict.passage_rows(s, L - 2, 6)
  fn = ict.IctPairs(s, corpus.tokenizer, max_seq_len=L, query_max_len=32, min_query_tokens=6,
                    keep_query_prob=0.5)
  row = rows[0]
  first, end = int(row[1]), int(row[2])
  full = int(s.line_offsets[end] - s.line_offsets[first]) + 2
  kept, queries = 0, set()
  for seed in range(300):
    ex = fn(row, np.random.default_rng(seed))
    kept += int(ex["attention_mask"].sum()) == full
    queries.add(tuple(ex["query_input_ids"][:int(ex["query_attention_mask"].sum())]))
    assert ex["passage_span"].tolist() == [int(row[0]), first, end]
  assert 0.4 < kept / 300 < 0.6
  assert len(queries) == len(ict.query_lines(s, first, end, 6)) > 1


def test_groups_hold_consecutive_passages_of_one_document(corpus):
  s = corpus.splits["train"]
  rows = ict.passage_rows(s, L - 2, 6)
  groups = ict.passage_groups(s, L - 2, 6, 4)
  assert groups.shape[1:] == (4, 3)
  assert (groups[:, :, 0] == groups[:, :1, 0]).all()  # one document per group
  # Every passage is in some group; a document's last group wraps round to its first.
  assert {tuple(r) for r in rows} == {tuple(r) for g in groups for r in g}
  docs = np.unique(rows[:, 0])
  assert len(groups) == sum(-(-int((rows[:, 0] == d).sum()) // 4) for d in docs)


def test_train_batches_are_groups_and_stats_flatten_them(corpus, bert_export):
  cfg = _cfg(contrastive={"group_size": 4}, train={"batch_size": 8})
  task = experiment.task_of(cfg)
  it = task.train_iterator(corpus, cfg.data, batch_size=8, seed=0)
  batch = next(it)
  assert batch["input_ids"].shape == (2, 4, L) and batch["query_input_ids"].shape == (2, 4, 32)
  assert batch["passage_span"].shape == (2, 4, 3)
  encoder = task.training_model(from_pretrained(str(bert_export)), cfg, quiet)
  grouped = task.stats(encoder, {k: jnp.asarray(v) for k, v in batch.items()})
  flat = task.stats(encoder, {k: jnp.asarray(v.reshape(8, *v.shape[2:]))
                              for k, v in batch.items()})
  assert float(grouped["ict_count"]) == 8.0 == float(task.counts(batch)["ict_count"])
  assert float(grouped["ict_loss_sum"]) == pytest.approx(float(flat["ict_loss_sum"]), rel=1e-6)


# ---- the loss ---------------------------------------------------------------------------
def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_info_nce_is_cross_entropy_over_the_valid_columns():
  rng = np.random.default_rng(0)
  q, p = _unit(rng.normal(size=(5, 8))), _unit(rng.normal(size=(5, 8)))
  w = np.array([1, 1, 1, 1, 0], np.float32)  # row 4 pads the batch
  # (doc, first line, end line): row 3 shares lines with rows 0 and 1, which only touch.
  span = np.array([[1, 10, 20], [1, 20, 30], [2, 10, 20], [1, 15, 25], [3, 0, 5]])
  nll, hit = contrastive.info_nce(jnp.asarray(q), jnp.asarray(p), jnp.asarray(w),
                                  jnp.asarray(span), 0.1)
  logits = q @ p.T / 0.1
  overlap = {(0, 3), (3, 0), (1, 3), (3, 1)}
  for i in range(4):
    cols = [j for j in range(5) if w[j] > 0 and (i, j) not in overlap]
    lse = np.log(np.exp(logits[i, cols]).sum())
    assert float(nll[i]) == pytest.approx(lse - logits[i, i], rel=1e-5)
    assert bool(hit[i]) == (logits[i, i] >= logits[i, cols].max())
  # Neither the padding row's passage nor row 0's repeat (row 3) is a negative of row 0.
  p2 = p.copy()
  p2[4] = p2[3] = q[0]
  nll2, _ = contrastive.info_nce(jnp.asarray(q), jnp.asarray(p2), jnp.asarray(w),
                                 jnp.asarray(span), 0.1)
  assert float(nll2[0]) == pytest.approx(float(nll[0]), rel=1e-6)


def test_the_trained_embedding_is_what_dense_retriever_computes(corpus, bert_export):
  model = from_pretrained(str(bert_export))
  encoder = contrastive.Contrastive().training_model(model, _cfg(), quiet)
  assert type(encoder).__name__ == "BertModel"
  np.testing.assert_array_equal(  # the body's weights, not the random init
      np.asarray(encoder.layers[0].attn.q.kernel.get_value()),
      np.asarray(model.bert.layers[0].attn.q.kernel.get_value()))
  tok = corpus.tokenizer
  texts = ["Now is the winter of our discontent", "To be, or not to be", "Exeunt"]
  for pooling in ("mean", "cls"):
    want = DenseRetriever(encoder, tok, pooling=pooling, max_length=L).embed(texts)
    ids = np.zeros((3, 32), np.int32)
    mask = np.zeros((3, 32), np.int32)
    for i, t in enumerate(texts):
      row = [tok.cls_id, *tok.encode(t), tok.sep_id]
      ids[i, :len(row)], mask[i, :len(row)] = row, 1
    got = contrastive.embed(encoder, jnp.asarray(ids), jnp.asarray(mask), pooling)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)


def test_gradients_reach_both_towers_and_the_loss_falls(corpus, bert_export):
  """Overfitting two batches: the InfoNCE loss of the shared encoder must fall."""
  task = _task(keep_query_prob=0.0)
  encoder = task.training_model(from_pretrained(str(bert_export)), _cfg(), quiet)
  ex = task.examples(corpus, "train", _cfg().data, 0)
  rows = [ex.transform(ex.source[i], np.random.default_rng(i)) for i in range(32)]
  batches = [{k: jnp.asarray(np.stack([r[k] for r in rows[a:a + 16]])) for k in rows[0]}
             for a in (0, 16)]
  graphdef, params = nnx.split(encoder, nnx.Param)
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, batch):
    def loss_fn(p):
      return task.loss(task.stats(nnx.merge(graphdef, p), batch))
    loss, g = jax.value_and_grad(loss_fn)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss

  losses = []
  for i in range(60):
    params, opt, loss = step(params, opt, batches[i % 2])
    losses.append(float(loss))
  assert losses[0] > 2.0  # about log(16) = 2.77 for a random encoder
  assert np.mean(losses[-2:]) < 0.5 * np.mean(losses[:2])


# ---- end to end -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, bert_export):
  wd = tmp_path_factory.mktemp("retriever") / "run"
  cfg = _cfg(model={"init_from": str(bert_export)},
             train={"steps": 4, "eval_every": 4, "log_every": 2, "learning_rate": 3e-3})
  rep = loop.train(cfg, str(wd))
  return cfg, wd, rep


def test_training_reports_every_retriever_and_exports_the_encoder(trained, bert_export):
  cfg, wd, rep = trained
  for prefix in ("", "bm25_", "mlm_mean_", "hybrid_"):
    for m in ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"):
      assert 0.0 <= rep[f"test_{prefix}{m}"] <= 1.0, prefix + m
    assert rep[f"test_{prefix}recall@1"] <= rep[f"test_{prefix}recall@5"] <= \
        rep[f"test_{prefix}recall@10"]
  assert rep["test_num_queries"] == rep["test_passages"] > 100
  rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
  assert any("val_recall@5" in r and "val_bm25_recall@5" in r for r in rows)
  assert any("in_batch_accuracy" in r for r in rows)
  # The export is a bare encoder, and it ranks the test queries exactly as reported.
  assert json.loads((wd / "model" / "config.json").read_text())["architectures"] == ["BertModel"]
  task = experiment.task_of(cfg)
  corpus = load_corpus(str(wd / "data"))
  queries, passages = task.eval_texts(corpus, "test", cfg)
  dense = DenseRetriever(str(wd / "model"), max_length=L, show_progress=False).index(passages)
  got = retrieval_metrics(dense.search(queries, 10)[0], np.arange(len(queries)))
  assert got["recall@5"] == pytest.approx(rep["test_recall@5"])
  assert got["mrr@10"] == pytest.approx(rep["test_mrr@10"])
  bm25 = BM25Retriever().index(passages)
  assert retrieval_metrics(bm25.search(queries, 10)[0], np.arange(len(queries)))[
      "recall@10"] == pytest.approx(rep["test_bm25_recall@10"])
  mlm = DenseRetriever(str(bert_export), max_length=L, show_progress=False).index(passages)
  assert retrieval_metrics(mlm.search(queries, 10)[0], np.arange(len(queries)))[
      "ndcg@10"] == pytest.approx(rep["test_mlm_mean_ndcg@10"])


def test_eval_mode_writes_every_figure_to_eval_json(trained):
  cfg, wd, rep = trained
  cfg = _cfg(model={"init_from": cfg.model.init_from}, eval={"split": "test"})
  out = loop.evaluate(cfg, str(wd))
  ev = json.loads((wd / "eval.json").read_text())
  assert ev == json.loads(json.dumps(out))
  for key in ("test_recall@1", "test_recall@5", "test_recall@10", "test_mrr@10",
              "test_ndcg@10", "test_bm25_recall@5", "test_mlm_mean_recall@5",
              "test_hybrid_recall@10", "test_in_batch_accuracy", "test_loss"):
    assert ev[key] == pytest.approx(rep[key]), key


# ---- bad input --------------------------------------------------------------------------
@pytest.mark.parametrize("section,override,needle", [
    ("contrastive", {"temperature": 0.0}, "contrastive.temperature must be > 0"),
    ("contrastive", {"pooling": "max"}, "contrastive.pooling must be one of"),
    ("contrastive", {"query_max_len": 65}, "contrastive.query_max_len must be in"),
    ("contrastive", {"min_query_tokens": 0}, "contrastive.min_query_tokens must be >= 1"),
    ("contrastive", {"keep_query_prob": 1.0}, "contrastive.keep_query_prob must be in"),
    ("contrastive", {"group_size": 3}, r"contrastive.group_size \(3\) must be >= 1, and "
     r"train.batch_size \(8\) must divide"),
    ("model", {"architectures": ["GPT2LMHeadModel"]}, "needs a BERT-family encoder"),
])
def test_bad_configs_are_one_line_errors(section, override, needle):
  cfg = _cfg(**{section: override})
  with pytest.raises(ConfigError, match=needle) as e:
    experiment.validate(cfg)
  assert "\n" not in str(e.value)


def test_a_split_without_query_lines_is_one_line(corpus):
  task = _task(min_query_tokens=60, query_max_len=62)
  with pytest.raises(ConfigError, match="the test split has no passage with a line of at "
                     "least contrastive.min_query_tokens=60") as e:
    task.examples(corpus, "test", _cfg().data, 0)
  assert "\n" not in str(e.value)
