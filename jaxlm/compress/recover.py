"""Recovery after pruning: a short fine-tune in which the pruned weights stay exactly zero,
and the perplexity that `PruneReport.perplexity` records before pruning, after it and
after recovery.

The masks hold through the optimizer, not the model: `FixedMasks` wraps the optimizer so
that both the gradients it sees and the updates it returns are zero wherever a mask is
False. A pruned weight starts at zero and never receives an update, so it stays exactly
zero (AdamW's weight decay is part of the update, so it is masked too); Adam's moments
for it stay zero as well, and gradient clipping measures only the live weights. optax's
own `masked` selects whole parameters, not elements, hence this small wrapper; the masks
live in the optimizer state, so a jitted step gets them as arguments, not as constants.

Everything else is the training code the loop uses: `train.steps.make_train_step` with
the task's loss (causal LM by default), `train.optim.make_optimizer` (AdamW, warmup then
decay, clipping, the non-finite guard) and, for perplexity, `train.evaluator.Evaluator`.
Every parameter trains (embeddings, norms, biases, the head and the live kernel weights).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from jaxlm import experiment, tasks
from jaxlm.compress.prune import PruneReport
from jaxlm.errors import ConfigError
from jaxlm.params import path_name
from jaxlm.train.evaluator import Evaluator
from jaxlm.train.optim import SkipNonFinite, make_optimizer
from jaxlm.train.steps import make_train_step


class FixedMasksState(NamedTuple):
  inner: optax.OptState
  masks: Any  # like the params: bool arrays for pruned kernels, a scalar True elsewhere


class FixedMasks(NamedTuple):
  """An optimizer whose gradients and updates are zeroed where `masks` is False."""

  inner: optax.GradientTransformation
  masks: Any

  def init(self, params) -> FixedMasksState:
    # Copies: a donating train step must not consume the caller's mask arrays.
    return FixedMasksState(self.inner.init(params), jax.tree.map(jnp.copy, self.masks))

  def update(self, grads, state: FixedMasksState, params=None):
    grads = _masked(grads, state.masks)
    updates, inner = self.inner.update(grads, state.inner, params)
    return _masked(updates, state.masks), FixedMasksState(inner, state.masks)


def _masked(tree, masks):
  return jax.tree.map(lambda x, m: jnp.where(m, x, jnp.zeros((), x.dtype)), tree, masks)


def mask_tree(params: nnx.State, masks: dict[str, jax.Array]) -> nnx.State:
  """A pytree shaped like `params`: each masked kernel's bool mask, True elsewhere. An
  unknown mask name or a shape mismatch is a ConfigError naming it."""
  flat = nnx.to_flat_state(params)
  shapes = {path_name(p): tuple(v.get_value().shape) for p, v in flat}
  for name, m in masks.items():
    if name not in shapes:
      raise ConfigError(f"recover: mask {name!r} names no parameter of the model")
    if tuple(m.shape) != shapes[name]:
      raise ConfigError(f"recover: mask {name!r} has shape {tuple(m.shape)}, the parameter "
                        f"{shapes[name]}")
  true = jnp.ones((), bool)
  return nnx.from_flat_state([(p, v.replace(jnp.asarray(masks.get(path_name(p), true), bool)))
                              for p, v in flat])


def mask_violations(model: nnx.Module, masks: dict[str, jax.Array]) -> int:
  """How many weights are non-zero where their mask is False (0 when the masks hold)."""
  flat = {path_name(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  return int(sum(jnp.sum((flat[n].get_value() != 0) & ~m) for n, m in masks.items()))


def train_config(**overrides) -> ml_collections.ConfigDict:
  """The experiment's `train` section (jaxlm.experiment.base_config) with `overrides`:
  what `recover` reads (learning_rate, warmup_steps, decay, weight_decay, ...)."""
  t = experiment.base_config().train
  unknown = sorted(set(overrides) - set(t.keys()))
  if unknown:
    raise ConfigError(f"recover: train.{unknown[0]} is not a train key")
  t.update(overrides)
  return t


def recover(model: nnx.Module, masks: dict[str, jax.Array] | PruneReport,
            batches: Iterator[dict], *, steps: int, train: ml_collections.ConfigDict | None
            = None, task: str = "causal", seed: int = 0,
            log: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Fine-tunes `model` in place for `steps` batches from `batches` with the masks fixed.

  Args:
    masks: a PruneReport or its `masks` (kernel name -> bool [in, out], True = live).
    batches: the task's training batches, e.g. `tasks.get("causal").train_iterator(...)`.
    train: the optimizer settings (`train_config(learning_rate=..., warmup_steps=...)`;
      `steps` there is replaced by `steps`).
    task: the registered task whose loss trains (jaxlm.tasks).

  Returns:
    {"steps", "losses" (one per step), "seconds", "skipped_steps"}.
  """
  if isinstance(masks, PruneReport):
    masks = masks.masks
  if steps < 1:
    raise ConfigError(f"recover: steps must be >= 1, got {steps}")
  t = train_config() if train is None else ml_collections.ConfigDict(train.to_dict())
  t.steps = steps
  guard, _ = make_optimizer(t)
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  params = jax.tree.map(jnp.copy, params)  # the step donates; the model keeps its own
  tx = SkipNonFinite(FixedMasks(guard.inner, mask_tree(params, masks)))
  opt_state = tx.init(params)
  step_fn = make_train_step(graphdef, tx, tasks.get(task), seed=seed, dropout=False)
  losses, t0 = [], time.time()
  metrics = {}
  for i in range(steps):
    batch = next(batches)
    params, opt_state, metrics = step_fn(params, opt_state, batch, jnp.int32(i), frozen)
    losses.append(metrics["loss"])
    if log is not None and (i + 1) % max(steps // 5, 1) == 0:
      log(f"recover: step {i + 1}/{steps} loss {float(metrics['loss']):.4f}")
  losses = [float(x) for x in jax.device_get(losses)]
  nnx.update(model, params)
  return {"steps": steps, "losses": losses, "seconds": time.time() - t0,
          "skipped_steps": int(metrics.get("skipped_steps", 0))}


def evaluator(model: nnx.Module, corpus, cfg, *, split: str = "validation",
              task: str = "causal") -> Callable[[nnx.Module], dict[str, float]]:
  """model -> the task's metrics on `split` ("loss", "perplexity", "accuracy", ...), on
  the fixed batches `cfg.data` / `cfg.eval` describe (jaxlm.train.evaluator); compiled
  once, for any model with `model`'s structure (pruned copies included)."""
  ev = Evaluator(corpus, cfg, nnx.graphdef(model), tasks.get(task), model.config.vocab_size)
  return lambda m: ev(nnx.state(m), split)
