"""`contrastive`: a BERT-family encoder trained into a dense retriever with InfoNCE over
in-batch negatives, on inverse-cloze pairs of the corpus (jaxlm/data/ict.py: a line as
the query, its passage without the line as the positive; Lee et al. 2019).

Queries and passages go through the one shared encoder and are pooled as
`jaxlm.retrieval.DenseRetriever` pools ("mean" over real tokens, or the [CLS] state),
then L2-normalized, so the exported encoder is the retriever as trained. For a batch of
B pairs the logits are cos(q_i, p_j) / `contrastive.temperature` and the loss is the
cross-entropy of the true passage among the B (the other B - 1 are the negatives). Rows
that pad an eval batch and repeats of a passage are never negatives. Under gradient
accumulation the negatives are those of the microbatch.

The trained model is the bare encoder (BertModel, RobertaModel or DistilBertModel) of
`model.init_from` (normally the main job's BERT; its MLM/NSP heads are left behind), and
that is what workdir/model holds. Batch metrics: the loss and in-batch top-1 accuracy.

Evaluation also ranks every passage of the split for every query (`split_metrics`):
recall@1/5/10, MRR@10 and nDCG@10 (jaxlm/evals/retrieval.py) of the trained encoder
(unprefixed), and of the baselines: BM25 (`bm25_`), the `model.init_from` encoder
mean-pooled before this training (`mlm_mean_`), and reciprocal rank fusion of BM25 and
the trained encoder (`hybrid_`). The queries are fixed (`EVAL_SEED`), the same for every
run. `--mode=eval` writes them all to eval.json.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.data import ict, pipeline
from jaxlm.errors import ConfigError
from jaxlm.evals.retrieval import retrieval_metrics
from jaxlm.models import auto
from jaxlm.pretrained import from_pretrained, resolve_dir
from jaxlm.retrieval.dense import pool
from jaxlm.tasks.base import Task, example_weights, fmt, mean_loss, register

# Model classes the task starts from, and the bare encoder it trains, per model_type.
ENCODERS = {"bert": "BertModel", "roberta": "RobertaModel", "distilbert": "DistilBertModel"}
POOLINGS = ("mean", "cls")
EVAL_SEED = 0  # chooses each evaluation passage's query line
RANK_DEPTH = 10  # ids ranked per query: recall@10, MRR@10, nDCG@10
BASELINES = ("bm25", "mlm_mean", "hybrid")
_NEG = -1e9  # logit of a column that is no candidate


@dataclasses.dataclass(frozen=True)
class Settings:
  """The `contrastive` config section (experiment.base_config)."""

  temperature: float = 0.05
  pooling: str = "mean"
  query_max_len: int = 32
  min_query_tokens: int = 6
  keep_query_prob: float = 0.1
  group_size: int = 1
  freeze_embeddings: bool = False
  init_from: str = ""  # model.init_from: the mlm_mean baseline

  @classmethod
  def of(cls, cfg) -> Settings:
    c = cfg.contrastive
    return cls(float(c.temperature), c.pooling, int(c.query_max_len), int(c.min_query_tokens),
               float(c.keep_query_prob), int(c.group_size), bool(c.freeze_embeddings),
               cfg.model.init_from)


def embed(model, ids_BT, mask_BT, pooling: str, rngs=None):
  out = model(ids_BT, attention_mask=mask_BT, rngs=rngs)
  return pool(out.last_hidden_state, mask_BT, pooling)


def info_nce(q_BD, p_BD, w_B, span_B3, temperature: float):
  """Per-row NLL of the true passage among the batch's, and whether it ranks first.
  span_B3 = (doc, first line, end line): passages that share lines are no negatives."""
  logits_BB = (q_BD @ p_BD.T) / temperature
  B = logits_BB.shape[0]
  eye_BB = jnp.eye(B, dtype=bool)
  doc, first, end = span_B3[:, 0], span_B3[:, 1], span_B3[:, 2]
  repeat_BB = ((doc[:, None] == doc[None, :]) & (first[:, None] < end[None, :])
               & (first[None, :] < end[:, None]) & ~eye_BB)
  invalid_BB = repeat_BB | (w_B[None, :] <= 0)
  logits_BB = jnp.where(invalid_BB, _NEG, logits_BB)
  nll_B = -jnp.diagonal(jax.nn.log_softmax(logits_BB, axis=-1))
  hit_B = logits_BB.argmax(-1) == jnp.arange(B)
  return nll_B, hit_B


def _flat(batch):
  """A training batch of groups [N, G, ...] as rows [N * G, ...] (eval batches are rows)."""
  if batch["input_ids"].ndim == 2:
    return batch
  return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}


@register
class Contrastive(Task):
  name = "contrastive"
  architectures: ClassVar[tuple[str, ...]] = (
      "BertModel", "BertForMaskedLM", "BertForPreTraining", "RobertaModel",
      "RobertaForMaskedLM", "DistilBertModel", "DistilBertForMaskedLM")
  model_kind = "a BERT-family encoder"

  def __init__(self, settings: Settings | None = None):
    self.s = settings or Settings()
    # Baseline rankings per (corpus, split): they do not change while the encoder trains.
    self._baselines: dict[tuple[str, str], tuple[Any, dict[str, float]]] = {}

  def bind(self, cfg) -> Contrastive:
    return Contrastive(Settings.of(cfg))

  # ---- config -------------------------------------------------------------------------
  def validate(self, cfg) -> None:
    c, L = cfg.contrastive, cfg.data.max_seq_len
    if not c.temperature > 0:
      raise ConfigError(f"contrastive.temperature must be > 0, got {c.temperature}")
    if c.pooling not in POOLINGS:
      raise ConfigError(f"contrastive.pooling must be one of {POOLINGS}, got {c.pooling!r}")
    if c.min_query_tokens < 1:
      raise ConfigError(f"contrastive.min_query_tokens must be >= 1, got {c.min_query_tokens}")
    if not c.min_query_tokens + 2 <= c.query_max_len <= L:
      raise ConfigError(f"contrastive.query_max_len must be in [min_query_tokens + 2, "
                        f"data.max_seq_len] = [{c.min_query_tokens + 2}, {L}], got "
                        f"{c.query_max_len}")
    if not 0.0 <= c.keep_query_prob < 1.0:
      raise ConfigError(f"contrastive.keep_query_prob must be in [0, 1), got "
                        f"{c.keep_query_prob}")
    t = cfg.train
    if c.group_size < 0 or t.batch_size % (max(c.group_size, 1) * t.grad_accum_steps):
      raise ConfigError(f"contrastive.group_size ({c.group_size}) must be >= 1, and "
                        f"train.batch_size ({t.batch_size}) must divide into groups of it in "
                        f"each of the train.grad_accum_steps ({t.grad_accum_steps}) microbatches")

  # ---- the trained model ----------------------------------------------------------------
  def training_model(self, model, cfg, log) -> nnx.Module:
    """The bare encoder of `model` (its MLM/NSP heads left behind), as its own class so
    the export loads as an encoder."""
    arch = ENCODERS.get(model.config.model_type, "BertModel")
    if model.config.architectures == [arch]:
      return model
    body = getattr(model, "bert", model)
    encoder = auto.build_model(model.config.replace(architectures=[arch]),
                               runtime=model.runtime, seed=cfg.seed)
    nnx.update(encoder, nnx.state(body, nnx.Param))
    log(f"contrastive: training the {arch} of {type(model).__name__} "
        f"({cfg.model.init_from or 'model.*, random init'}) as a dense retriever "
        f"({self.s.pooling} pooling, temperature {self.s.temperature})")
    return encoder

  def trainable(self, model):
    """With contrastive.freeze_embeddings, everything but the embeddings trains."""
    if not self.s.freeze_embeddings:
      return None
    return lambda path, value: isinstance(value, nnx.Param) and path[0] != "embeddings"

  # ---- data ---------------------------------------------------------------------------
  def _pairs(self, corpus, split: str, data_cfg, keep: float) -> ict.IctPairs:
    return ict.IctPairs(corpus.splits[split], corpus.tokenizer,
                        max_seq_len=data_cfg.max_seq_len, query_max_len=self.s.query_max_len,
                        min_query_tokens=self.s.min_query_tokens, keep_query_prob=keep)

  def examples(self, corpus, split, data_cfg, seed):
    """Training: groups of `group_size` passages of one document (train_iterator batches
    groups); evaluation: single pairs, one fixed query per passage."""
    s, budget = corpus.splits[split], data_cfg.max_seq_len - 2
    if split == "train" and self.s.group_size == 0:  # a random window around each query line
      rows = ict.query_rows(s, self.s.min_query_tokens)[:, None, :]
      random = True
      fn = ict.IctGroups(self._pairs(corpus, split, data_cfg, self.s.keep_query_prob))
    elif split == "train":
      rows = ict.passage_groups(s, budget, self.s.min_query_tokens, self.s.group_size)
      random = True
      fn = ict.IctGroups(self._pairs(corpus, split, data_cfg, self.s.keep_query_prob))
    else:
      rows = ict.eval_rows(s, budget, self.s.min_query_tokens, EVAL_SEED)
      random = False
      fn = self._pairs(corpus, split, data_cfg, 0.0)
    if len(rows) == 0:
      raise ConfigError(f"data: the {split} split has no passage with a line of at least "
                        f"contrastive.min_query_tokens={self.s.min_query_tokens} tokens")
    return pipeline.Examples(grain.MapDataset.source(rows), fn, random)

  def train_iterator(self, corpus, data_cfg, *, batch_size: int, seed: int,
                     process_index: int = 0, process_count: int = 1):
    """Batches of batch_size / group_size groups ([groups, G, ...]; `stats` flattens)."""
    return pipeline.train_iterator(self.examples(corpus, "train", data_cfg, seed), data_cfg,
                                   batch_size=batch_size // max(self.s.group_size, 1), seed=seed,
                                   process_index=process_index, process_count=process_count)

  def vocab_positions_fraction(self, data_cfg) -> float:
    return 0.0  # no vocabulary projection

  # ---- the step -----------------------------------------------------------------------
  def stats(self, model, batch, rngs=None):
    batch = _flat(batch)
    q_BD = embed(model, batch["query_input_ids"], batch["query_attention_mask"],
                 self.s.pooling, rngs)
    p_BD = embed(model, batch["input_ids"], batch["attention_mask"], self.s.pooling, rngs)
    w_B = example_weights(batch)
    nll_B, hit_B = info_nce(q_BD, p_BD, w_B, batch["passage_span"], self.s.temperature)
    return {"ict_loss_sum": (nll_B * w_B).sum(), "ict_correct": (hit_B * w_B).sum(),
            "ict_count": w_B.sum()}

  def counts(self, batch):
    return {"ict_count": example_weights(_flat(batch)).sum()}

  def loss(self, stats):
    return mean_loss(stats, "ict")

  # ---- metrics ------------------------------------------------------------------------
  def train_metrics(self, m):
    return {"in_batch_accuracy": float(m["ict_correct"] / max(m["ict_count"], 1))}

  def eval_metrics(self, sums, unigram_nll):
    n = max(sums["ict_count"], 1.0)
    return {"loss": sums["ict_loss_sum"] / n, "in_batch_accuracy": sums["ict_correct"] / n,
            "num_pairs": sums["ict_count"]}

  def unigram_log_probs(self, corpus, vocab_size):
    return None  # the baselines are other retrievers (split_metrics)

  def baseline_sums(self, corpus, batch) -> dict[str, float]:
    return {}

  def split_metrics(self, model, corpus, split: str, cfg) -> dict[str, Any]:
    return self.retrieval_eval(model, corpus, split, cfg)

  def retrieval_eval(self, model, corpus, split: str, cfg) -> dict[str, Any]:
    """Ranking metrics of `model` and of the baselines over the split's passages."""
    from jaxlm.retrieval import HybridRetriever
    queries, passages = self.eval_texts(corpus, split, cfg)
    relevant = np.arange(len(queries))
    dense = self._dense(model, corpus, cfg).index(passages)
    out: dict[str, Any] = {"num_queries": len(queries)}
    out.update(retrieval_metrics(dense.search(queries, RANK_DEPTH)[0], relevant))
    bm25, base = self._baseline(corpus, split, cfg, queries, passages, model.runtime)
    out.update(base)
    hybrid = HybridRetriever(bm25, dense)  # both already hold the passages
    out.update({f"hybrid_{k}": v for k, v in retrieval_metrics(
        hybrid.search(queries, RANK_DEPTH)[0], relevant).items()})
    return out

  def eval_texts(self, corpus, split: str, cfg) -> tuple[list[str], list[str]]:
    rows = ict.eval_rows(corpus.splits[split], cfg.data.max_seq_len - 2,
                         self.s.min_query_tokens, EVAL_SEED)
    return ict.eval_texts(corpus, split, rows)

  def _dense(self, model, corpus, cfg, pooling: str | None = None):
    from jaxlm.retrieval import DenseRetriever
    return DenseRetriever(model, corpus.tokenizer, pooling=pooling or self.s.pooling,
                          max_length=cfg.data.max_seq_len, show_progress=False)

  def _baseline(self, corpus, split, cfg, queries, passages, runtime):
    """(the BM25 retriever over the passages, the baselines' metrics), once per split."""
    from jaxlm.retrieval import BM25Retriever
    key = (corpus.directory, split)
    if key not in self._baselines:
      relevant = np.arange(len(queries))
      bm25 = BM25Retriever().index(passages)
      out = {f"bm25_{k}": v for k, v in retrieval_metrics(
          bm25.search(queries, RANK_DEPTH)[0], relevant).items()}
      if self.s.init_from:
        mlm = from_pretrained(resolve_dir(self.s.init_from), runtime=runtime)
        dense = self._dense(mlm, corpus, cfg, pooling="mean").index(passages)
        out.update({f"mlm_mean_{k}": v for k, v in retrieval_metrics(
            dense.search(queries, RANK_DEPTH)[0], relevant).items()})
      self._baselines[key] = (bm25, out)
    return self._baselines[key]

  # ---- report -------------------------------------------------------------------------
  def samples(self, model, corpus, evaluator, cfg):
    """Three test queries with the passage the trained encoder ranks first."""
    queries, passages = self.eval_texts(corpus, "test", cfg)
    queries, n = queries[:3], len(passages)
    ids_QK, _ = self._dense(model, corpus, cfg).index(passages).search(queries, 1)
    return {"retrieval_examples": [
        {"query": q, "top1_is_positive": bool(ids_QK[i, 0] == i),
         "top1": passages[int(ids_QK[i, 0])][:160]} for i, q in enumerate(queries)],
        "test_passages": n}

  def report_lines(self, rep):
    lines = []
    for split in ("val", "test"):
      if f"{split}_recall@5" not in rep:
        continue
      lines.append(f"{split}: in-batch accuracy {fmt(rep, f'{split}_in_batch_accuracy')} "
                   f"({fmt(rep, f'{split}_num_queries')} inverse-cloze queries); "
                   "recall@1/@5/@10, MRR@10, nDCG@10:")
      for prefix, name in (("", "contrastive (trained)"), ("mlm_mean_", "MLM encoder, mean"),
                           ("bm25_", "BM25"), ("hybrid_", "hybrid (BM25 + trained, RRF)")):
        if f"{split}_{prefix}recall@5" in rep:
          lines.append(f"  {name:30s} " + " ".join(
              fmt(rep, f"{split}_{prefix}{m}") for m in ("recall@1", "recall@5", "recall@10",
                                                         "mrr@10", "ndcg@10")))
    for ex in rep.get("retrieval_examples", []):
      lines.append(f"  {'hit ' if ex['top1_is_positive'] else 'miss'} {ex['query']!r}")
    return lines
