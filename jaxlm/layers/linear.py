"""Dense projection with mixed precision: params in param_dtype, matmul inputs in dtype,
accumulation and outputs in float32 (on CPU/AMX this is what makes bf16 fast)."""

import jax
import jax.numpy as jnp
from flax import nnx


def normal_init(std: float):
  return jax.nn.initializers.normal(stddev=std)


@jax.custom_vjp
def _bf16_matmul(x, w):
  return jnp.matmul(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                    preferred_element_type=jnp.float32)


def _bf16_matmul_fwd(x, w):
  x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  # Zero-size carriers of the input dtypes (residuals must be arrays).
  carriers = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
  return jnp.matmul(x16, w16, preferred_element_type=jnp.float32), (x16, w16, carriers)


def _bf16_matmul_bwd(res, g):
  # The default gradient feeds an f32 cotangent, and XLA then runs both backward matmuls
  # in f32; casting it to bf16 keeps them on the fast path. The weight gradient is
  # written as an explicit 2-D transpose-matmul: XLA:CPU has no bf16 kernel for the
  # batched dot with a transposed left operand that autodiff would emit.
  x16, w16, (x_like, w_like) = res
  g16 = g.astype(jnp.bfloat16)
  dx = jnp.matmul(g16, w16.T, preferred_element_type=jnp.float32)
  dw = jnp.matmul(x16.reshape(-1, x16.shape[-1]).T, g16.reshape(-1, g16.shape[-1]),
                  preferred_element_type=jnp.float32)
  return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def matmul(x, w, dtype):
  """x @ w with operands cast to `dtype` and float32 accumulation."""
  if jnp.dtype(dtype) == jnp.bfloat16 and w.ndim == 2:
    return _bf16_matmul(x, w)
  return jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


class Dense(nnx.Module):
  """y = x @ kernel + bias, kernel laid out [in, out] (the transpose of torch Linear).

  `axes` names the kernel's two dimensions for sharding (jaxlm.parallel.rules), e.g.
  ("embed", "mlp"); the bias takes the output's name.
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               init_std: float = 0.02, axes: tuple = (None, None), dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.kernel = nnx.Param(normal_init(init_std)(rngs.params(), (in_features, out_features),
                                                  param_dtype), axes=tuple(axes))
    self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype), axes=(axes[1],))
                 if use_bias else None)
    self.dtype = dtype

  def __call__(self, x):
    y = matmul(x, self.kernel[...], self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y
