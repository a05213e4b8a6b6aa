"""Dense projection with mixed precision: params in param_dtype, matmul inputs in dtype,
accumulation and outputs in float32 (on CPU/AMX this is what makes bf16 fast)."""

import jax
import jax.numpy as jnp
from flax import nnx


def normal_init(std: float):
  return jax.nn.initializers.normal(stddev=std)


def matmul(x, w, dtype):
  """x @ w with operands cast to `dtype` and float32 accumulation."""
  return jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


class Dense(nnx.Module):
  """y = x @ kernel + bias, kernel laid out [in, out] (the transpose of torch Linear)."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               init_std: float = 0.02, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.kernel = nnx.Param(normal_init(init_std)(rngs.params(), (in_features, out_features),
                                                  param_dtype))
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
    self.dtype = dtype

  def __call__(self, x):
    y = matmul(x, self.kernel[...], self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y
