"""Train the main job's BERT into a dense retriever: InfoNCE with in-batch negatives on
inverse-cloze pairs (a line as the query, its passage without it as the positive).

  python -m jaxlm.main --config=configs/default.py --workdir=runs/default
  python -m jaxlm.main --config=configs/retriever.py --workdir=runs/retriever \\
      --config.model.init_from=runs/default
  python -m jaxlm.main --config=configs/retriever.py --workdir=runs/retriever --mode=eval

Training uses the default --mode=train (the task reads the pretraining corpus, not a
labeled set). Every validation ranks all validation passages for every query and keeps
the model with the best recall@5. --mode=eval writes eval.json: recall@1/5/10, MRR@10
and nDCG@10 on the test split's inverse-cloze queries for the trained encoder and for
BM25 (`bm25_`), the MLM encoder mean-pooled (`mlm_mean_`) and the hybrid (`hybrid_`).
The trained encoder is exported to workdir/model (a BertModel that
`jaxlm.retrieval.DenseRetriever` loads). Variants: `:cls` pools the [CLS] state instead
of the mean; `:tiny` is a seconds-long smoke run (from scratch, or from a
`configs/default.py:tiny` workdir as model.init_from); comma-separated they combine.
"""

from jaxlm import experiment


def get_config(arg=None):
  c = experiment.base_config()
  c.model.init_from = "runs/default"
  c.model.update(dtype="bfloat16")
  c.train.objective = "contrastive"
  c.data.max_seq_len = 128  # passages: runs of whole lines, at most 126 tokens
  # Groups of 4 consecutive passages of one scene: their neighbours are the hardest
  # negatives (the same speakers and names), and they lift test recall@5 (see README).
  c.contrastive.update(temperature=0.05, pooling="mean", query_max_len=32,
                       min_query_tokens=6, keep_query_prob=0.1, group_size=4)
  c.train.update(steps=1500, batch_size=64, learning_rate=5e-4, warmup_steps=100,
                 decay="linear", eval_every=250, log_every=50,
                 early_stopping_metric="recall@5", keep_best=True)
  c.eval.batch_size = 64
  c.checkpoint.every = 250
  variants = (arg or "").split(",")
  if "cls" in variants:
    c.contrastive.pooling = "cls"
  if "tiny" in variants:  # configs/default.py:tiny's model, so it may start from one
    c.model.init_from = ""
    c.model.update(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=64,
                   position_embedding_type="rope", dtype="float32")
    c.tokenizer.vocab_size = 1024
    c.data.max_seq_len = 64
    c.train.update(steps=6, batch_size=8, warmup_steps=1, eval_every=3, log_every=3,
                   learning_rate=1e-3)
    c.eval.update(batch_size=16, max_batches=2)
    c.checkpoint.every = 3
  if set(variants) - {"", "cls", "tiny"}:
    raise ValueError(f"unknown variant {arg!r}; use :cls, :tiny (comma-separated)")
  return c
