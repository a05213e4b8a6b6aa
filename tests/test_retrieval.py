"""Retrieval: chunking, the exact JAX index against NumPy, dense / BM25 / hybrid retrievers,
persistence, reciprocal rank fusion by hand, faiss behind the same interface, bad input."""

import itertools
import json

import jax
import numpy as np
import pytest
from conftest import fixture

from jaxlm import ConfigError, ModelConfig, build_model, save_pretrained
from jaxlm.data.tokenizer import train_tokenizer
from jaxlm.retrieval import (
  BM25Retriever,
  DenseRetriever,
  ExactIndex,
  HybridRetriever,
  chunk_documents,
  reciprocal_rank_fusion,
)

LINES = ["To be, or not to be, that is the question.",
         "Now is the winter of our discontent made glorious summer by this sun of York.",
         "All the world's a stage, and all the men and women merely players.",
         "Friends, Romans, countrymen, lend me your ears.",
         "If music be the food of love, play on.",
         "The quality of mercy is not strained. It droppeth as the gentle rain from heaven.",
         "Once more unto the breach, dear friends, once more!",
         "A horse! a horse! my kingdom for a horse!",
         "Good night, good night! Parting is such sweet sorrow.",
         "Some are born great, some achieve greatness, and some have greatness thrust upon 'em."]
DOCS = ["\n".join(LINES[i:] + LINES[:i]) for i in range(0, 10, 3)] + [
    ("Out, out, brief candle! Life's but a walking shadow, a poor player that struts and "
     "frets his hour upon the stage, and then is heard no more. It is a tale told by an "
     "idiot, full of sound and fury, signifying nothing.")]
QUERIES = ["the winter of our discontent", "my kingdom for a horse", "a tale told by an idiot",
           "lend me your ears"]


@pytest.fixture(scope="module")
def tok():
  return train_tokenizer(DOCS * 5, kind="wordpiece", vocab_size=400)


def bert(vocab: int, seed: int = 0, max_positions: int = 64):
  return build_model(ModelConfig(
      architectures=["BertModel"], vocab_size=vocab, hidden_size=32, num_hidden_layers=1,
      num_attention_heads=2, intermediate_size=64, max_position_embeddings=max_positions,
      position_embedding_type="rope", hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0), seed=seed)


@pytest.fixture(scope="module")
def encoder(tok):
  return bert(tok.vocab_size)


@pytest.fixture(scope="module")
def chunks(tok):
  return chunk_documents(DOCS, tok, chunk_tokens=30, overlap_tokens=12)


@pytest.fixture(scope="module")
def dense(encoder, tok, chunks):
  return DenseRetriever(encoder, tok, pooling="mean", batch_size=8).index(chunks)


@pytest.fixture(scope="module")
def bm25(chunks):
  pytest.importorskip("bm25s")
  return BM25Retriever().index(chunks)


def numpy_top_k(x_ND, q_QD, k):
  s_QN = q_QD.astype(np.float64) @ x_ND.astype(np.float64).T
  ids = np.argsort(-s_QN, axis=1, kind="stable")[:, :k]
  return ids, np.take_along_axis(s_QN, ids, 1), s_QN


def assert_same_top_k(ids, scores, x_ND, q_QD, k, tol=1e-5, ties=1e-3):
  """`ids` equal NumPy's top-k, except where the scores tie within `tol` (at most a
  fraction `ties` of them)."""
  ref_ids, ref_scores, s_QN = numpy_top_k(x_ND, q_QD, k)
  np.testing.assert_allclose(scores, ref_scores, atol=tol)
  mismatch = ids != ref_ids
  # A differing id must be a tie: its true score equals the reference's at that rank.
  assert np.all(np.abs(np.take_along_axis(s_QN, ids, 1) - ref_scores)[mismatch] < tol)
  assert mismatch.mean() <= ties


# ---- chunking --------------------------------------------------------------------------------
def at_boundary(doc: str, i: int) -> bool:
  """Whether position i starts a line or a sentence."""
  return i == 0 or doc[:i].rstrip(" ")[-1] in "\n.!?"


def test_chunks_fit_the_budget_keep_offsets_overlap_and_cut_at_lines(tok, chunks):
  assert len({c.doc_id for c in chunks}) == len(DOCS)
  for c in chunks:
    assert DOCS[c.doc_id][c.start:c.end] == c.text
    assert c.num_tokens == len(tok.encode(c.text)) <= 30
  overlapping = 0
  for doc_id, doc in enumerate(DOCS):
    mine = [c for c in chunks if c.doc_id == doc_id]
    assert mine[0].start == 0 and mine[-1].end == len(doc)  # the whole document is covered
    for a, b in itertools.pairwise(mine):
      assert a.start < b.start and not doc[a.end:b.start].strip()  # overlap, or adjacent
      assert len(tok.encode(doc[b.start:a.end])) <= 12
      overlapping += b.start < a.end
    if doc_id < 4:  # line documents: every line and sentence fits, so chunks hold whole ones
      assert all(at_boundary(doc, c.start) and at_boundary(doc, c.end + 1) for c in mine)
  assert overlapping >= 5  # the tail of a chunk starts the next one
  assert chunk_documents(DOCS, tok, 30, 0) != chunks


def test_a_sentence_longer_than_a_chunk_is_cut_at_words(tok):
  doc = DOCS[-1]
  out = chunk_documents([doc, "", "  \n "], tok, chunk_tokens=8, overlap_tokens=0,
                        doc_ids=["macbeth", "blank", "space"])
  assert {c.doc_id for c in out} == {"macbeth"}
  assert all(c.num_tokens <= 8 and doc[c.start:c.end] == c.text for c in out)
  assert all(doc[c.start - 1] == " " for c in out[1:])  # at word boundaries
  assert "".join(doc[c.start:c.end] + " " for c in out).split() == doc.split()


# ---- the exact index -------------------------------------------------------------------------
def test_exact_index_matches_numpy_on_1e5_vectors():
  rng = np.random.default_rng(0)
  x_ND = rng.standard_normal((100_000, 128), dtype=np.float32)
  x_ND /= np.linalg.norm(x_ND, axis=1, keepdims=True)
  q_QD = rng.standard_normal((70, 128), dtype=np.float32)  # one full batch of 64, then 6
  q_QD /= np.linalg.norm(q_QD, axis=1, keepdims=True)
  index = ExactIndex(x_ND)
  ids, scores = index.search(q_QD, 10)
  assert ids.shape == scores.shape == (70, 10) and ids.dtype == np.int64
  assert_same_top_k(ids, scores, x_ND, q_QD, 10)
  # More candidates per query than one group holds: a smaller group, still exact.
  ids, scores = index.search(q_QD[:3], 100)
  assert_same_top_k(ids, scores, x_ND, q_QD[:3], 100)


def test_exact_index_small_and_padded():
  rng = np.random.default_rng(1)
  x_ND = rng.standard_normal((37, 8), dtype=np.float32)
  q_QD = rng.standard_normal((5, 8), dtype=np.float32)
  ids, scores = ExactIndex(x_ND, block_rows=8).search(q_QD, 40)  # 5 blocks; k > N
  assert_same_top_k(ids[:, :37], scores[:, :37], x_ND, q_QD, 37)
  assert (ids[:, 37:] == -1).all() and np.isneginf(scores[:, 37:]).all()
  # All scores negative: the zero rows that pad the last block must never win.
  x_ND = np.abs(rng.standard_normal((1000, 8), dtype=np.float32))
  q_QD = -np.abs(rng.standard_normal((3, 8), dtype=np.float32))
  index = ExactIndex(x_ND, block_rows=256)  # blocks of 256, the last 232 rows padded
  assert [x.shape[0] for x in index.blocks] == [256] * 4 and index.valid_last == 232
  if jax.default_backend() == "cpu":  # the device blocks are views of the host copy
    assert all(x.unsafe_buffer_pointer() == index.x_ND[256 * i:].ctypes.data
               for i, x in enumerate(index.blocks))
  ids, scores = index.search(q_QD, 5)
  assert_same_top_k(ids, scores, x_ND, q_QD, 5)
  assert (scores < 0).all()
  x_ND = rng.standard_normal((37, 8), dtype=np.float32)
  x_ND[3] = x_ND[30]  # an exact tie goes to the lower id
  ids, _ = ExactIndex(x_ND, block_rows=8).search(x_ND[30:31], 2)
  assert ids.tolist() == [[3, 30]]
  with pytest.raises(ConfigError, match=r"queries: expected shape \[Q, 8\], got \[3, 7\]"):
    ExactIndex(x_ND).search(q_QD[:, :7], 3)


# ---- dense -----------------------------------------------------------------------------------
def test_dense_embeddings_are_pooled_normalized_and_padding_free(dense, encoder, tok):
  text = LINES[1]
  ids = [tok.cls_id, *tok.encode(text), tok.sep_id]
  h_TD = np.asarray(encoder(np.array([ids])).last_hidden_state[0])
  v = dense.embed([LINES[0], text, "x"])  # padded to 32 tokens in a batch of 8
  want = h_TD.mean(0) / np.linalg.norm(h_TD.mean(0))
  np.testing.assert_allclose(v[1], want, atol=2e-5)
  np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
  cls = DenseRetriever(encoder, tok, pooling="cls").embed([text])[0]
  np.testing.assert_allclose(cls, h_TD[0] / np.linalg.norm(h_TD[0]), atol=2e-5)


def test_dense_search_is_numpy_search_of_the_embeddings(dense, chunks):
  ids, scores = dense.search(QUERIES, 5)
  x_ND = dense.embed([c.text for c in chunks])
  assert_same_top_k(ids, scores, x_ND, dense.embed(QUERIES), 5, ties=1.0)  # repeated lines
  assert dense.texts == [c.text for c in chunks] and dense.chunks == chunks
  ids, scores = dense.search([c.text for c in chunks[:4]], 1)  # a text finds itself
  assert ids[:, 0].tolist() == [0, 1, 2, 3] and np.allclose(scores, 1.0, atol=1e-5)


def test_dense_index_reloads_to_identical_results(dense, encoder, tok, tmp_path):
  dense.save(str(tmp_path / "idx"))
  again = DenseRetriever.load(str(tmp_path / "idx"), encoder, tok)
  for k in (1, 5, 200):
    a, b = dense.search(QUERIES, k), again.search(QUERIES, k)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
  assert again.chunks == dense.chunks
  manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
  assert manifest["num_texts"] == len(dense.texts) and manifest["pooling"] == "mean"


def test_an_index_opened_with_another_encoder_or_tokenizer_is_an_error(dense, encoder, tok,
                                                                        tmp_path):
  d = str(tmp_path / "idx")
  dense.save(d)
  with pytest.raises(ConfigError, match=r"manifest.json: the index was built with another "
                     r"encoder \(\w{12}, given \w{12}\)"):
    DenseRetriever.load(d, bert(tok.vocab_size, seed=1), tok)
  other = train_tokenizer(DOCS * 5, kind="wordpiece", vocab_size=400, lowercase=True)
  with pytest.raises(ConfigError, match="built with another tokenizer"):
    DenseRetriever.load(d, encoder, other)
  with pytest.raises(ConfigError, match="is not here; pass encoder= and tokenizer="):
    DenseRetriever.load(d)  # built from objects: nowhere to find the encoder
  with pytest.raises(ConfigError, match="manifest.json: a 'dense' index, not a 'bm25' one"):
    BM25Retriever.load(d)
  with pytest.raises(ConfigError, match=r"not an index directory \(no manifest.json\)"):
    DenseRetriever.load(str(tmp_path), encoder, tok)


def test_dense_from_a_model_directory_records_it(tmp_path, tok, chunks):
  model_dir = tmp_path / "enc"
  save_pretrained(bert(tok.vocab_size, seed=3), str(model_dir))
  tok.save(str(model_dir))
  r = DenseRetriever(str(model_dir), pooling="cls", batch_size=4).index(chunks[:9])
  r.save(str(tmp_path / "idx"))
  again = DenseRetriever.load(str(tmp_path / "idx"))  # the encoder found from the manifest
  assert again.encoder_dir == str(model_dir) and again.pooling == "cls"
  np.testing.assert_array_equal(r.search(QUERIES, 3)[0], again.search(QUERIES, 3)[0])


def test_dense_over_a_hugging_face_bert_directory():
  """A transformers BertModel directory (absolute positions, token types) as the encoder."""
  small = train_tokenizer(DOCS * 5, kind="wordpiece", vocab_size=200)
  r = DenseRetriever(fixture("bert"), small, max_length=32).index(LINES)
  assert r.encoder_dir == fixture("bert") and r.encoder.config.position_embedding_type == "absolute"
  ids, scores = r.search(LINES[:4], 1)
  assert ids[:, 0].tolist() == [0, 1, 2, 3] and np.allclose(scores, 1.0, atol=1e-5)


def test_dense_bad_input(encoder, tok):
  with pytest.raises(ConfigError, match="max_length=65 is larger than the encoder's context "
                     r"\(64 positions\)"):
    DenseRetriever(encoder, tok, max_length=65)
  r = DenseRetriever(encoder, tok)  # 64 positions less [CLS] and [SEP]
  with pytest.raises(ConfigError, match="chunk_tokens=63 is larger than the encoder's "
                     "context: 62 tokens"):
    r.chunk(DOCS, chunk_tokens=63)
  assert max(c.num_tokens for c in r.chunk(DOCS, 62)) <= 62
  assert DenseRetriever(encoder, tok).index([DOCS[0], LINES[0]]).num_truncated == 1  # warned
  for texts in ([], ["", "  \n"]):
    with pytest.raises(ConfigError, match=r"DenseRetriever.index: empty corpus"):
      r.index(texts)
  with pytest.raises(ConfigError, match="chunk_documents: empty corpus"):
    chunk_documents(["", " "], tok)
  with pytest.raises(ConfigError, match=r"overlap_tokens must be in \[0, chunk_tokens=8\)"):
    chunk_documents(DOCS, tok, chunk_tokens=8, overlap_tokens=8)
  with pytest.raises(ConfigError, match="nothing indexed"):
    r.search(QUERIES, 3)
  with pytest.raises(ConfigError, match="pooling must be one of"):
    DenseRetriever(encoder, tok, pooling="max")
  with pytest.raises(ConfigError, match="takes no option 'M'"):
    DenseRetriever(encoder, tok, backend="exact", M=16)
  with pytest.raises(ConfigError, match="queries must be a list of strings"):
    DenseRetriever(encoder, tok).index(LINES).search("a string", 3)


# ---- BM25 and hybrid -------------------------------------------------------------------------
def test_bm25_finds_the_line_and_reloads_identically(bm25, chunks, tmp_path):
  ids, scores = bm25.search(QUERIES, 3)
  for q, row in zip(QUERIES, ids):
    assert q in chunks[row[0]].text
  assert (np.diff(scores, axis=1) <= 0).all()
  bm25.save(str(tmp_path / "bm25"))
  again = BM25Retriever.load(str(tmp_path / "bm25"))
  a, b = bm25.search(QUERIES, 7), again.search(QUERIES, 7)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert again.chunks == chunks
  ids, scores = BM25Retriever().index(LINES[:3]).search(["winter"], 5)  # k past the end
  assert ids.tolist() == [[1, 0, 2, -1, -1]] and np.isneginf(scores[0, 3:]).all()
  with pytest.raises(ConfigError, match="BM25Retriever.index: empty corpus"):
    BM25Retriever().index([])


class Fixed:
  """A retriever that returns fixed rankings, for fusion by hand."""

  def __init__(self, ranking, kind):
    self.ranking, self.kind, self.texts, self.chunks = ranking, kind, ["t"] * 5, None

  def search(self, queries, k):
    ids = np.array([self.ranking[:k]] * len(queries))
    return ids, -np.arange(ids.shape[1], dtype=np.float32)[None].repeat(len(queries), 0)


def test_reciprocal_rank_fusion_by_hand():
  # sparse ranks 2, 0, 1; dense ranks 1, 2, 3 (rrf_k = 60, ranks from 1):
  #   id 2: 1/61 + 1/62 = .0325217   id 1: 1/63 + 1/61 = .0322664
  #   id 0: 1/62        = .0161290   id 3: 1/63        = .0158730   id 4: absent
  h = HybridRetriever(Fixed([2, 0, 1], "bm25"), Fixed([1, 2, 3], "dense"), depth=3)
  ids, scores = h.search(["q", "r"], 5)
  assert ids.tolist() == [[2, 1, 0, 3, -1]] * 2
  np.testing.assert_allclose(scores[0, :4], [1 / 61 + 1 / 62, 1 / 63 + 1 / 61, 1 / 62, 1 / 63],
                             rtol=1e-6)
  # Equal fused scores go to the lower id; rrf_k changes the weights of ranks.
  ids, scores = reciprocal_rank_fusion([np.array([[4, 7]]), np.array([[7, 4]])], 2, rrf_k=0)
  assert ids.tolist() == [[4, 7]] and np.allclose(scores, 1.5)
  ids, _ = reciprocal_rank_fusion([np.array([[5, 6, 7]]), np.array([[7, -1, -1]])], 3, rrf_k=0)
  assert ids.tolist() == [[7, 5, 6]]  # 1/3 + 1 beats 1 and 1/2


def test_hybrid_indexes_both_and_reloads_identically(bm25, dense, encoder, tok, chunks,
                                                    tmp_path):
  h = HybridRetriever(bm25, dense, depth=20)
  ids, scores = h.search(QUERIES, 5)
  s_ids, _ = bm25.search(QUERIES, 20)
  d_ids, _ = dense.search(QUERIES, 20)
  want, _ = reciprocal_rank_fusion([s_ids, d_ids], 5)
  np.testing.assert_array_equal(ids, want)
  h.save(str(tmp_path / "h"))
  again = HybridRetriever.load(str(tmp_path / "h"), encoder, tok)
  np.testing.assert_array_equal(again.search(QUERIES, 5)[0], ids)
  np.testing.assert_array_equal(again.search(QUERIES, 5)[1], scores)
  fresh = HybridRetriever(BM25Retriever(), DenseRetriever(encoder, tok)).index(chunks)
  assert fresh.texts == [c.text for c in chunks]
  with pytest.raises(ConfigError, match="HybridRetriever.index: empty corpus"):
    HybridRetriever(BM25Retriever(), DenseRetriever(encoder, tok)).index([])


# ---- faiss -----------------------------------------------------------------------------------
def test_faiss_backends_behind_the_same_interface(encoder, tok, chunks, dense, tmp_path):
  pytest.importorskip("faiss")
  flat = DenseRetriever(encoder, tok, backend="faiss_flat").index(chunks)
  a, b = dense.search(QUERIES, 5), flat.search(QUERIES, 5)
  np.testing.assert_allclose(a[1], b[1], atol=1e-5)
  hnsw = DenseRetriever(encoder, tok, backend="faiss_hnsw", M=8, ef_search=32).index(chunks)
  ids, _ = hnsw.search(QUERIES, 5)
  assert np.mean([len(set(x) & set(y)) / 5 for x, y in zip(ids, a[0])]) >= 0.8
  hnsw.save(str(tmp_path / "h"))
  again = DenseRetriever.load(str(tmp_path / "h"), encoder, tok)
  assert again.store.index.hnsw.efSearch == 32
  np.testing.assert_array_equal(again.search(QUERIES, 5)[0], ids)
  ivf = DenseRetriever(encoder, tok, backend="faiss_ivf", nlist=2, nprobe=2).index(chunks)
  np.testing.assert_allclose(ivf.search(QUERIES, 5)[1], b[1], atol=1e-5)  # every cell probed

