"""Evaluation on fixed batches of a split, for any task."""

from __future__ import annotations

import jax

from jaxlm.data.corpus import Corpus
from jaxlm.parallel import distributed
from jaxlm.tasks import Task
from jaxlm.train.steps import make_eval_step


class Evaluator:
  """Fixed eval batches per split (built once) and the task's metrics on them.

  Each task is compared with a unigram model of the same tokenizer on the same targets
  (masked tokens for MLM, next tokens for causal LM): `unigram_perplexity`.
  """

  def __init__(self, corpus: Corpus, cfg, graphdef, task: Task, vocab_size: int,
               batch_sharding=None):
    self.corpus, self.cfg, self.task = corpus, cfg, task
    self.batch_sharding = batch_sharding
    self.eval_step = make_eval_step(graphdef, task)
    self.unigram_logp = task.unigram_log_probs(corpus, vocab_size)
    self._batches: dict[str, list] = {}
    self._ready: dict[str, tuple[list, float]] = {}

  def batches(self, split: str) -> list:
    if split not in self._batches:
      self._batches[split] = list(self.task.eval_batches(
          self.corpus, split, self.cfg.data, batch_size=self.cfg.eval.batch_size,
          seed=self.cfg.seed + 1, max_batches=self.cfg.eval.max_batches or None))
    return self._batches[split]

  def _prepared(self, split: str) -> tuple[list, float]:
    """(the split's batches on the mesh, the unigram model's NLL sum on their targets):
    both fixed for the run, so placed and summed once, not at every evaluation."""
    if split not in self._ready:
      placed, uni_sum = [], 0.0
      for batch in self.batches(split):
        on_device = batch
        if self.batch_sharding is not None:
          first, n = distributed.local_rows(self.batch_sharding, len(batch["example_weight"]))
          on_device = distributed.put_batch({k: v[first:first + n] for k, v in batch.items()},
                                            self.batch_sharding)
        placed.append(on_device)
        labels, w = self.task.unigram_targets(batch)
        w = w * batch["example_weight"][:, None]
        uni_sum -= float((self.unigram_logp[labels] * w).sum())
      self._ready[split] = (placed, uni_sum)
    return self._ready[split]

  def __call__(self, params, split: str) -> dict[str, float]:
    sums: dict[str, float] = {}
    placed, uni_sum = self._prepared(split)
    for on_device in placed:
      for k, v in jax.device_get(self.eval_step(params, on_device)).items():
        sums[k] = sums.get(k, 0.0) + float(v)
    return self.task.eval_metrics(sums, uni_sum)
