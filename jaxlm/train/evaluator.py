"""Evaluation on fixed batches of a split, for any task."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data.corpus import Corpus
from jaxlm.parallel import distributed
from jaxlm.tasks import Task
from jaxlm.train.steps import make_eval_step, merge


class Evaluator:
  """Fixed eval batches per split (built once) and the task's metrics on them.

  Each task is compared with a unigram model of the same tokenizer on the same targets
  (masked tokens for MLM, next tokens for causal LM): `unigram_perplexity`.
  """

  def __init__(self, corpus: Corpus, cfg, graphdef, task: Task, vocab_size: int,
               batch_sharding=None):
    self.corpus, self.cfg, self.task = corpus, cfg, task
    self.batch_sharding = batch_sharding
    self.graphdef, self.eval_step = graphdef, make_eval_step(graphdef, task)
    self.unigram_logp = task.unigram_log_probs(corpus, vocab_size)
    self._batches: dict[str, list] = {}
    self._ready: dict[str, tuple[list, float]] = {}

  def batches(self, split: str) -> list:
    if split not in self._batches:
      self._batches[split] = list(self.task.eval_batches(
          self.corpus, split, self.cfg.data, batch_size=self.cfg.eval.batch_size,
          seed=self.cfg.seed + 1, max_batches=self.cfg.eval.max_batches or None))
    return self._batches[split]

  def _prepared(self, split: str) -> tuple[list, float, dict]:
    """(the split's batches on the mesh, the unigram model's NLL sum on their targets):
    both fixed for the run, so placed and summed once, not at every evaluation."""
    if split not in self._ready:
      placed, uni_sum, baseline = [], 0.0, {}
      for batch in self.batches(split):
        on_device = batch
        if self.batch_sharding is not None:
          first, n = distributed.local_rows(self.batch_sharding, len(batch["example_weight"]))
          on_device = distributed.put_batch({k: v[first:first + n] for k, v in batch.items()},
                                            self.batch_sharding)
        placed.append(on_device)
        if self.unigram_logp is not None:
          labels, w = self.task.unigram_targets(batch)
          w = w * batch["example_weight"][:, None]
          uni_sum -= float((self.unigram_logp[labels] * w).sum())
        else:  # fine-tuning tasks: their own baseline, summed on the host once
          for k, v in self.task.baseline_sums(self.corpus, batch).items():
            baseline[k] = baseline.get(k, 0.0) + v
      self._ready[split] = (placed, uni_sum, baseline)
    return self._ready[split]

  def __call__(self, params, split: str) -> dict[str, float]:
    """The task's metrics on `split`. Batch statistics (scalars, or arrays such as a
    confusion matrix) add up on the device; the host reads them once, at the end."""
    placed, uni_sum, baseline = self._prepared(split)
    total = None
    for on_device in placed:
      stats = self.eval_step(params, on_device)
      total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    sums = {k: (float(v) if np.ndim(v) == 0 else np.asarray(v, np.float64))
            for k, v in jax.device_get(total or {}).items()}
    if self.task.finetune:  # their metrics name classes, read records
      metrics = self.task.eval_metrics({**sums, **baseline}, uni_sum, data=self.corpus)
    else:
      metrics = self.task.eval_metrics(sums, uni_sum)
    if type(self.task).split_metrics is Task.split_metrics:
      return metrics
    model = merge(self.graphdef, *params) if isinstance(params, tuple) else merge(
        self.graphdef, params)
    return {**metrics, **self.task.split_metrics(model, self.corpus, split, self.cfg)}
