"""Dropout driven by an explicit nnx.Rngs passed at call time (None = deterministic)."""

import jax
import jax.numpy as jnp
from flax import nnx


def dropout(x, rate: float, rngs: nnx.Rngs | None):
  if rngs is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
