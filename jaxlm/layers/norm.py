"""LayerNorm and RMSNorm, computed in float32 whatever the compute dtype."""

import jax
import jax.numpy as jnp
from flax import nnx


class LayerNorm(nnx.Module):

  def __init__(self, features: int, *, eps: float = 1e-12, use_bias: bool = True,
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs  # deterministic init; accepted for a uniform layer signature
    # Norm parameters are tiny: replicated (no sharding axes).
    self.scale = nnx.Param(jnp.ones((features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((features,), param_dtype)) if use_bias else None
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

  def __init__(self, features: int, *, eps: float = 1e-6, param_dtype=jnp.float32,
               rngs: nnx.Rngs | None = None):
    del rngs
    self.scale = nnx.Param(jnp.ones((features,), param_dtype))
    self.eps = eps

  def __call__(self, x):
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
    return y * self.scale[...]
