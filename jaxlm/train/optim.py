"""Optimizers: AdamW (or SGD with momentum), warmup then decay, clipping, no weight
decay on biases and norms, and a guard that never applies a non-finite step."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(t) -> optax.Schedule:
  warmup = optax.linear_schedule(0.0, t.learning_rate, max(t.warmup_steps, 1))
  decay_steps = max(t.steps - t.warmup_steps, 1)
  end = t.learning_rate * t.end_learning_rate_factor
  if t.decay == "cosine":
    decay = optax.cosine_decay_schedule(t.learning_rate, decay_steps, alpha=t.end_learning_rate_factor)
  elif t.decay == "linear":
    decay = optax.linear_schedule(t.learning_rate, end, decay_steps)
  else:
    decay = optax.constant_schedule(t.learning_rate)
  return optax.join_schedules([warmup, decay], [t.warmup_steps])


def decay_mask(params):
  """Weight decay on matrices (kernels, embeddings) only: 1-D params are biases/norm scales."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


class GuardState(NamedTuple):
  inner: optax.OptState
  skipped_in_a_row: jax.Array  # [] int32: non-finite steps since the last finite one
  skipped_total: jax.Array  # [] int32
  first_skipped_step: jax.Array  # [] int32: the update count of the first one, -1 = none
  count: jax.Array  # [] int32: updates seen


class SkipNonFinite(NamedTuple):
  """Wraps an optimizer so that a step whose loss or gradient norm is not finite changes
  nothing (parameters and optimizer state stay as they were) and is counted instead, on
  the device: the loop reads the counters with the metrics it fetches anyway. Like
  optax.apply_if_finite, but it also looks at the loss and never gives up skipping."""

  inner: optax.GradientTransformation

  def init(self, params) -> GuardState:
    # Four separate buffers: a donating step must not see one buffer twice.
    z = lambda v: jnp.full((), v, jnp.int32)  # noqa: E731
    return GuardState(self.inner.init(params), z(0), z(0), z(-1), z(0))

  def update(self, grads, state: GuardState, params=None, *, finite=True):
    updates, inner = self.inner.update(grads, state.inner, params)
    finite = jnp.asarray(finite)
    updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
    inner = jax.tree.map(lambda n, o: jnp.where(finite, n, o), inner, state.inner)
    bad = (~finite).astype(jnp.int32)
    first = jnp.where((state.first_skipped_step < 0) & ~finite, state.count,
                      state.first_skipped_step)
    return updates, GuardState(inner, (state.skipped_in_a_row + 1) * bad,
                               state.skipped_total + bad, first, state.count + 1)


def make_optimizer(t) -> tuple[SkipNonFinite, optax.Schedule]:
  schedule = learning_rate_schedule(t)
  if t.optimizer == "sgd":
    opt = optax.chain(optax.add_decayed_weights(t.weight_decay, mask=decay_mask),
                      optax.sgd(schedule, momentum=t.momentum))
  else:
    opt = optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                      mask=decay_mask)
  if t.grad_clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), opt)
  return SkipNonFinite(opt), schedule
