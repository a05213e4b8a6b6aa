"""Dense projection with mixed precision: params in param_dtype, matmul inputs in dtype,
accumulation and outputs in float32 (on CPU/AMX this is what makes bf16 fast)."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.parallel.rules import sharded_over_devices


def normal_init(std: float):
  return jax.nn.initializers.normal(stddev=std)


def materialize(x):
  """x, computed into a buffer of its own on single-device CPU; x itself elsewhere.

  XLA:CPU fuses a transpose into the matmul that reads it, and its matmuls with a
  transposed left operand run at half speed in bf16 (a sixth slower in f32); an
  elementwise chain is fused, and recomputed, in every consumer. It never fuses across a
  conditional, so `x` passes through one whose predicate it cannot fold. CPU drops
  optimization barriers, so they cannot serve. On a mesh, reading an element would cost a
  collective, and other backends do not need it, so there it is the identity.
  (docs/performance.md#matmul-layouts-on-cpu, #xla-cpu-fusion-and-barriers)
  """
  if jax.default_backend() != "cpu" or sharded_over_devices() or x.size == 0:
    return x
  first = x.reshape(-1)[0]
  return jax.lax.cond(first == first, lambda t: t, lambda t: t + 0.0 * t, x)


def _contract_last(a, b):
  """a [..., K] . b [N, K] -> [..., N] (a @ b.T), written so XLA:CPU does not transpose b."""
  return jax.lax.dot_general(a, b, (((a.ndim - 1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _product(x, w, transpose_w: bool):
  if transpose_w:
    return _contract_last(x, w)
  return jnp.matmul(x, w, preferred_element_type=jnp.float32)


def _rows(a):
  return a.reshape(-1, a.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x, w, dtype, transpose_w):
  return _product(x.astype(dtype), w.astype(dtype), transpose_w)


def _matmul_fwd(x, w, dtype, transpose_w):
  xc, wc = x.astype(dtype), w.astype(dtype)
  # Zero-size carriers of the input dtypes (residuals must be arrays).
  carriers = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
  return _product(xc, wc, transpose_w), (xc, wc, carriers)


def _matmul_bwd(dtype, transpose_w, res, g):
  # Autodiff would feed the f32 cotangent to both matmuls, and XLA would then run them in
  # f32 even for bf16 operands; the cast keeps them on the fast path. The weight gradient
  # is a 2-D matmul with the transposed operand materialized (see `materialize`); XLA:CPU
  # has no bf16 kernel for the batched dot with a transposed left operand that autodiff
  # would emit.
  xc, wc, (x_like, w_like) = res
  gc = g.astype(dtype)
  if transpose_w:  # y = x @ w^T, w [out, in]
    dx = jnp.matmul(gc, wc, preferred_element_type=jnp.float32)
    dw = jnp.matmul(materialize(_rows(gc).T), _rows(xc), preferred_element_type=jnp.float32)
  else:
    dx = _contract_last(gc, wc)
    dw = jnp.matmul(materialize(_rows(xc).T), _rows(gc), preferred_element_type=jnp.float32)
  return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def _einsum(spec, a, b, dtype, b_grad_order):
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _einsum_fwd(spec, a, b, dtype, b_grad_order):
  ac, bc = a.astype(dtype), b.astype(dtype)
  carriers = (jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))
  out = jnp.einsum(spec, ac, bc, preferred_element_type=jnp.float32)
  return out, (ac, bc, carriers)


def _einsum_bwd(spec, dtype, b_grad_order, res, g):
  ac, bc, (a_like, b_like) = res
  ins, out = spec.split("->")
  in_a, in_b = ins.split(",")
  gc = g.astype(dtype)
  da = jnp.einsum(f"{out},{in_b}->{in_a}", gc, bc, preferred_element_type=jnp.float32)
  order = b_grad_order or in_b
  db = jnp.einsum(f"{in_a},{out}->{order}", ac, gc, preferred_element_type=jnp.float32)
  if order != in_b:
    db = jnp.einsum(f"{order}->{in_b}", db)
  return da.astype(a_like.dtype), db.astype(b_like.dtype)


_einsum.defvjp(_einsum_fwd, _einsum_bwd)


def einsum(spec: str, a, b, dtype, *, b_grad_order: str | None = None):
  """jnp.einsum of two operands cast to `dtype`, accumulated in float32, with a backward
  pass that casts the cotangent to `dtype` too, as `matmul` does (autodiff would run both
  gradient einsums in float32 even for bf16 operands). `b_grad_order` computes b's
  gradient with its indices in that order and transposes it after: attention's K and V
  gradients contract the large [.., T, S] tensor over (group, query) and, computed as
  [B, K, H, S], read it in place instead of copying it transposed. Every index of each
  operand must appear in the other operand or the output (true of attention's)."""
  return _einsum(spec, a, b, jnp.dtype(dtype), b_grad_order)


def matmul(x, w, dtype, transpose_w: bool = False):
  """x @ w (x @ w^T if `transpose_w`) with operands cast to `dtype` and float32
  accumulation."""
  if w.ndim == 2:
    return _matmul(x, w, jnp.dtype(dtype), transpose_w)
  w = jnp.swapaxes(w, -1, -2) if transpose_w else w
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
