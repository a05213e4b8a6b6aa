"""Jitted train and eval steps, for any task (jaxlm/tasks/).

Parameters travel as an nnx.State pytree; the model is rebuilt inside the jitted
function with nnx.merge, which costs nothing at run time. A task's `stats` returns sums
(not means) of its losses and hits, so eval batches aggregate exactly.
"""

from __future__ import annotations

import ctypes
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlm.peft import lora
from jaxlm.tasks import Task
from jaxlm.train.optim import SkipNonFinite


def make_train_step(graphdef, tx: optax.GradientTransformation, task: Task, *, seed: int,
                    dropout: bool, grad_accum_steps: int = 1, out_shardings=None):
  """(params, opt_state, batch, step[, frozen]) -> (params, opt_state, metrics).

  `params` are the trained parameters; `frozen`, when given, the rest of the model's
  state (fine-tuning with frozen layers or LoRA: jaxlm/train/finetune.py). Only `params`
  get gradients and optimizer state.

  The loss is `task.loss(stats)` plus the MoE auxiliary losses, if any.

  The dropout key is fold_in(seed, step) (and the microbatch index under accumulation),
  so a resumed run draws the same masks. With `grad_accum_steps` = A the batch is split
  into A microbatches whose gradients a scan sums; for dense models this is the full
  batch's gradient up to float summation order. `out_shardings` pins the new params and
  optimizer state to their layout on a mesh.
  """
  A = grad_accum_steps

  def grads_of(params, batch, key, counts, frozen):
    def loss_fn(p):
      model = merge(graphdef, p, frozen)
      rngs = nnx.Rngs(dropout=key) if dropout else None
      stats = task.stats(lora.lora_dropout(model, rngs), batch, rngs)
      scaled = {**stats, **counts}
      return task.loss(scaled) + stats.get("moe_loss", 0.0) / A, stats

    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  def train_step(params, opt_state, batch, step, frozen=None):
    key = jax.random.fold_in(jax.random.key(seed), step)
    if A == 1:
      (loss, stats), grads = grads_of(params, batch, key, {}, frozen)
    else:
      counts = task.counts(batch)
      micro = jax.tree.map(lambda x: x.reshape(A, x.shape[0] // A, *x.shape[1:]), batch)

      def body(carry, i):
        mb = jax.tree.map(lambda x: x[i], micro)
        (loss_i, stats_i), grads_i = grads_of(params, mb, jax.random.fold_in(key, i), counts,
                                              frozen)
        return jax.tree.map(jnp.add, carry, (loss_i, stats_i, grads_i)), None

      (loss0, stats0), grads0 = jax.eval_shape(
          grads_of, params, jax.tree.map(lambda x: x[0], micro), key, counts, frozen)
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (loss0, stats0, grads0))
      (loss, stats, grads), _ = jax.lax.scan(body, zeros, jnp.arange(A))
      stats = {k: v / A if k in task.mean_stats else v for k, v in stats.items()}
    grad_norm = optax.tree.norm(grads)
    guard = {}
    if isinstance(tx, SkipNonFinite):  # a non-finite step changes nothing
      updates, opt_state = tx.update(grads, opt_state, params,
                                     finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm))
      guard = {"skipped_steps": opt_state.skipped_total,
               "skipped_in_a_row": opt_state.skipped_in_a_row,
               "first_skipped_step": opt_state.first_skipped_step}
    else:
      updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "grad_norm": grad_norm, **stats, **guard}

  return _compiled_then_trimmed(
      jax.jit(train_step, donate_argnums=(0, 1), out_shardings=out_shardings))


def release_host_memory() -> None:
  """Hands the C heap's free pages back to the OS (glibc malloc_trim; a no-op elsewhere).

  Compiling a train step leaves the compiler's freed memory scattered through the heap, too
  fragmented to hold the step's buffers, which then come on top of it: on CPU, where those
  buffers live in the same memory, a third more peak RSS for nothing
  (docs/performance.md#memory-and-allocator)."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _compiled_then_trimmed(jitted):
  """`jitted`, compiled ahead of its first run (the compile is cached, so the call that
  follows reuses it) with the compiler's memory released in between."""
  state = {"first": True}

  @functools.wraps(jitted)
  def call(*args):
    if state["first"]:
      jitted.lower(*args).compile()
      release_host_memory()
      state["first"] = False
    return jitted(*args)

  call.lower = jitted.lower
  return call


def merge(graphdef, params, frozen=None):
  """The model from its graphdef and state (the trained part, and the frozen one). A
  three-way split needs copy=True under nnx.remat (google/flax#5050)."""
  if frozen is None:
    return nnx.merge(graphdef, params)
  return nnx.merge(graphdef, params, frozen, copy=True)


def make_eval_step(graphdef, task: Task):
  @jax.jit
  def eval_step(params, batch):
    """`params`: the model's whole state, or a (trained, frozen) pair."""
    stats = task.stats(merge(graphdef, *params) if isinstance(params, tuple)
                       else merge(graphdef, params), batch)
    return {k: v for k, v in stats.items() if k != "expert_fraction"}  # sums only

  return eval_step
