"""Optimizers: AdamW (or SGD with momentum), warmup then decay, clipping, and no weight
decay on biases and norms."""

import jax
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


def make_optimizer(t) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(t)
  if t.optimizer == "sgd":
    opt = optax.chain(optax.add_decayed_weights(t.weight_decay, mask=decay_mask),
                      optax.sgd(schedule, momentum=t.momentum))
  else:
    opt = optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                      mask=decay_mask)
  if t.grad_clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), opt)
  return opt, schedule
