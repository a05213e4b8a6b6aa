"""The Task interface: everything the generic loop, evaluator and report need to know
about one training objective, and the helpers several tasks share.

## Adding a task

A task is one module in jaxlm/tasks/ holding one `Task` subclass, decorated with
`@register`, plus its import line in jaxlm/tasks/__init__.py, plus a config that sets
`train.objective` to its name. Nothing else in jaxlm changes: the train loop
(train/loop.py), the steps (train/steps.py), the evaluator and the report look the
objective up once (`jaxlm.tasks.get`) and call these methods. Fill in:

- `check_model`: which model classes (and config flags) it can train; `validate` for its
  own experiment-config keys. Errors are one-line ConfigErrors naming the key.
- `model_ids`: the token ids a freshly built model needs (vocabulary, pad, eos, ...).
- `examples`: how a corpus split becomes examples (jaxlm.data.pipeline has builders for
  BERT pairs, packed causal rows and span corruption; tasks/sop.py shows how to vary one).
- `stats`: the jitted forward pass. Return SUMS (losses, hits, counts), not means, so
  evaluation batches and gradient-accumulation microbatches add up exactly; `loss` turns
  them into the scalar to minimize, dividing by the `counts` (which gradient accumulation
  computes over the whole batch).
- `train_metrics` / `eval_metrics`: what metrics.jsonl gets at log and eval steps.
- `unigram_log_probs` / `unigram_targets`: the baseline the report compares with.
- `samples` / `report_lines`: what report.json and the printed report show.

tasks/causal.py is the shortest complete example; tasks/sop.py adds an objective by
reusing pieces of others.
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.data import pipeline
from jaxlm.errors import ConfigError
from jaxlm.layers.vocab_loss import cross_entropy_sums

TASKS: dict[str, Task] = {}  # train.objective -> task


def register(cls: type[Task]) -> type[Task]:
  """Class decorator: makes `cls.name` a valid train.objective."""
  if cls.name in TASKS:
    raise ValueError(f"task {cls.name!r} registered twice")
  TASKS[cls.name] = cls()
  return cls


class Task(abc.ABC):
  """One training objective. Stateless: methods get the config and data they need."""

  name: ClassVar[str]
  # Model classes (Hugging Face names) this task trains, and what they are in words;
  # check_model's default test.
  architectures: ClassVar[tuple[str, ...]] = ()
  model_kind: ClassVar[str] = "a model"
  # Fine-tuning tasks (tasks/finetune_base.py) start from model.init_from and read labeled
  # data; the loop and evaluator branch on this flag, never on a task's name.
  finetune: ClassVar[bool] = False
  # Keys of `stats` that are per-microbatch means (averaged over microbatches under
  # gradient accumulation) rather than sums.
  mean_stats: ClassVar[tuple[str, ...]] = ("moe_loss", "router_aux_loss", "router_z_loss",
                                           "expert_fraction")

  # ---- config -----------------------------------------------------------------------
  def check_model(self, model: ModelConfig, source: str) -> None:
    """Raises ConfigError unless this task can train the model `source` describes."""
    arch = (model.architectures or ["BertForPreTraining"])[0]
    if arch not in self.architectures:
      raise ConfigError(f"train.objective={self.name!r} needs {self.model_kind} "
                        f"({_names(self.architectures)}), but {source} names {arch!r}")

  def validate(self, cfg) -> None:
    """Checks the experiment-config keys this task reads (beyond the schema's own)."""

  def model_ids(self, tokenizer, data_cfg) -> dict[str, Any]:
    """ModelConfig token ids for a model built from scratch on this tokenizer."""
    return {"vocab_size": tokenizer.vocab_size, "pad_token_id": tokenizer.pad_id}

  def bind(self, cfg) -> Task:
    """This task for one experiment config (experiment.task_of): itself, or a configured
    copy for a task whose steps read its own config section (tasks/distill.py)."""
    return self

  # ---- the trained model (defaults: the model the loop builds or loads trains whole) ----
  def tokenizer_dir(self, cfg) -> str:
    """A model directory whose tokenizer the data must use ("": the config's own)."""
    return ""

  def training_model(self, model, cfg, log) -> Any:
    """What trains: `model` (built from model.* or loaded from model.init_from), or a
    composition of it, e.g. a student with its frozen teacher."""
    return model

  def trainable(self, model) -> Any:
    """An nnx filter of the parameters that train, or None for all of them; the rest is
    frozen (no gradients, no optimizer state, not checkpointed)."""
    return None

  def exported_model(self, model) -> Any:
    """The part of the trained model that is exported and counted in the report."""
    return model

  # ---- data -------------------------------------------------------------------------
  @abc.abstractmethod
  def examples(self, corpus, split: str, data_cfg, seed: int) -> pipeline.Examples:
    """A corpus split as examples (a grain source and a per-example function)."""

  def train_iterator(self, corpus, data_cfg, *, batch_size: int, seed: int,
                     process_index: int = 0, process_count: int = 1):
    return pipeline.train_iterator(self.examples(corpus, "train", data_cfg, seed), data_cfg,
                                   batch_size=batch_size, seed=seed,
                                   process_index=process_index, process_count=process_count)

  def eval_batches(self, corpus, split: str, data_cfg, *, batch_size: int, seed: int,
                   max_batches: int | None = None):
    return pipeline.eval_batches(self.examples(corpus, split, data_cfg, seed),
                                 batch_size=batch_size, seed=seed, max_batches=max_batches)

  def vocab_positions_fraction(self, data_cfg) -> float:
    """The fraction of positions projected onto the vocabulary (for FLOPs and MFU)."""
    return 1.0

  # ---- the step (traced inside jit) ---------------------------------------------------
  @abc.abstractmethod
  def stats(self, model, batch, rngs=None) -> dict[str, jax.Array]:
    """Sums of losses, hits and counts for one batch (plus router statistics)."""

  @abc.abstractmethod
  def counts(self, batch) -> dict[str, jax.Array]:
    """The loss denominators, from the batch alone (see the module docstring)."""

  @abc.abstractmethod
  def loss(self, stats) -> jax.Array:
    """The scalar to minimize, from `stats` (whose counts may be the whole batch's)."""

  # ---- metrics ----------------------------------------------------------------------
  def train_metrics(self, m: dict) -> dict[str, float]:
    """Task metrics for a metrics.jsonl row at a log step, from the step's stats."""
    return {}

  @abc.abstractmethod
  def eval_metrics(self, sums: dict[str, float], unigram_nll: float) -> dict[str, float]:
    """Validation/test metrics from summed eval stats and the unigram model's NLL sum on
    the same targets. Must include "loss" (early stopping reads it)."""

  def split_metrics(self, model, corpus, split: str, cfg) -> dict[str, Any]:
    """Metrics of the model over a whole split that are no sums of batch statistics (e.g.
    retrieval ranks every passage for every query), added to the evaluator's. Only a
    task that overrides this makes the evaluator rebuild the model for it."""
    return {}

  def unigram_log_probs(self, corpus, vocab_size: int) -> np.ndarray:
    """log p(token) [V] of the baseline unigram model."""
    return corpus.unigram_log_probs()

  def unigram_targets(self, batch) -> tuple[np.ndarray, np.ndarray]:
    """(target ids, weights) of an eval batch, for the unigram baseline."""
    return batch["masked_ids"], batch["masked_weights"]

  # ---- report -----------------------------------------------------------------------
  def samples(self, model, corpus, evaluator, cfg) -> dict[str, Any]:
    """Entries for report.json showing what the model does (on the test split)."""
    return {}

  def report_lines(self, rep: dict[str, Any]) -> list[str]:
    """The printed report's lines for this task (after the headline)."""
    return []


def get(name: str) -> Task:
  """The registered task for a train.objective value."""
  if name not in TASKS:
    raise ConfigError(f"train.objective must be one of {tuple(sorted(TASKS))}, got {name!r}")
  return TASKS[name]


def _names(architectures) -> str:
  return architectures[0] if len(architectures) == 1 else f"one of {sorted(architectures)}"


# ---- helpers shared by tasks -----------------------------------------------------------
def example_weights(batch):
  """Per-row weights: 0 for the rows that pad the last eval batch, else 1."""
  return batch.get("example_weight", jnp.ones(batch["input_ids"].shape[0], jnp.float32))


def token_stats(projection, targets_BT, w_BT, prefix: str):
  """Summed NLL, hits and count where w_BT > 0 (teacher-forced token prediction), from the
  fused vocabulary projection and cross-entropy (no [B, T, V] logits kept)."""
  loss_sum, correct = cross_entropy_sums(projection, targets_BT, w_BT)
  return {f"{prefix}_loss_sum": loss_sum, f"{prefix}_correct": correct,
          f"{prefix}_count": w_BT.sum()}


def classifier_stats(logits_BC, labels_B, w_B, prefix: str):
  """Summed NLL, hits and count of a classifier head."""
  logp_BC = jax.nn.log_softmax(logits_BC.astype(jnp.float32))
  nll_B = -jnp.take_along_axis(logp_BC, labels_B[:, None], axis=-1)[:, 0]
  return {f"{prefix}_loss_sum": (nll_B * w_B).sum(),
          f"{prefix}_correct": ((logp_BC.argmax(-1) == labels_B) * w_B).sum(),
          f"{prefix}_count": w_B.sum()}


def mean_loss(stats, prefix: str):
  return stats[f"{prefix}_loss_sum"] / jnp.maximum(stats[f"{prefix}_count"], 1.0)


def router_stats(model, out) -> dict:
  """MoE: the weighted auxiliary losses (added to the loss) and router balance."""
  if out.aux_loss is None:
    return {}
  cfg = model.config
  z = out.router_z_loss if out.router_z_loss is not None else jnp.zeros(())
  return {"moe_loss": cfg.router_aux_loss_coef * out.aux_loss + cfg.router_z_loss_coef * z,
          "router_aux_loss": out.aux_loss, "router_z_loss": z,
          "expert_fraction": out.expert_fraction}


def accuracy(m: dict, prefix: str) -> float:
  return m[f"{prefix}_correct"] / max(m[f"{prefix}_count"], 1)


def token_metrics(sums: dict, unigram_nll: float, prefix: str) -> dict[str, float]:
  """Mean NLL, perplexity, accuracy and the unigram baseline's perplexity over tokens."""
  n = max(sums[f"{prefix}_count"], 1.0)
  loss = sums[f"{prefix}_loss_sum"] / n
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
          "accuracy": sums[f"{prefix}_correct"] / n,
          "unigram_perplexity": math.exp(unigram_nll / n)}


def fmt(rep: dict, key: str) -> str:
  v = rep.get(key)
  return "n/a" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.4g}")
