"""LayerNorm and RMSNorm, computed in float32 whatever the compute dtype.

Both normalize over the last axis; `features` may be a shape, e.g. (heads, head_dim) for
a per-head q/k norm with its own scale for each head (Cohere)."""

import jax
import jax.numpy as jnp
from flax import nnx


def _shape(features) -> tuple[int, ...]:
  return (features,) if isinstance(features, int) else tuple(features)


class LayerNorm(nnx.Module):

  def __init__(self, features: int | tuple[int, ...], *, eps: float = 1e-12,
               use_bias: bool = True,
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs  # deterministic init; accepted for a uniform layer signature
    # Norm parameters are tiny: replicated (no sharding axes).
    self.scale = nnx.Param(jnp.ones(_shape(features), param_dtype))
    self.bias = nnx.Param(jnp.zeros(_shape(features), param_dtype)) if use_bias else None
    self.eps = eps

  def __call__(self, x):
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...]
    if self.bias is not None:
      y = y + self.bias[...]
    return y


class RMSNorm(nnx.Module):
  """x / rms(x) * (scale_offset + scale). Gemma stores its scale around 0 and multiplies
  by (1 + scale) (`scale_offset=1.0`), in float32 like everything here."""

  def __init__(self, features: int | tuple[int, ...], *, eps: float = 1e-6,
               scale_offset: float = 0.0,
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs
    # Initialized so that the effective scale starts at 1 either way.
    self.scale = nnx.Param(jnp.full(_shape(features), 1.0 - scale_offset, param_dtype))
    self.eps = eps
    self.scale_offset = scale_offset

  def __call__(self, x):
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    return y * (scale + self.scale_offset if self.scale_offset else scale)
