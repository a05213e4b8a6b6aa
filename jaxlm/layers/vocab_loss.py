"""The vocabulary projection fused with softmax cross-entropy, for training and evaluation.

The logits h @ W over the vocabulary are the largest activation of a language-model step
([B, T, V] in float32). The fused op never keeps them. It works through the positions in
chunks, and because the loss ends the graph, its forward pass under differentiation
computes the gradients for h, W and the bias right there, from each chunk's softmax; the
backward pass only scales them by the incoming cotangent. That is the same three matmuls
as autodiff, without the saved logits, the separate softmax backward, the [V, N]
transposes XLA:CPU inserts for the weight gradient, or an argmax over the vocabulary (a
position is a hit when its target logit is the maximum). Measured gains:
docs/performance.md#training-step-cost.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.layers.activations import softcap as apply_softcap
from jaxlm.layers.linear import _product, materialize, matmul

# Positions per chunk: at most this many logits live at once (16 MiB in float32), unless
# that would take more than MAX_CHUNKS chunks (the loop over them is unrolled).
CHUNK_LOGITS = 1 << 22
MAX_CHUNKS = 8


@flax.struct.dataclass
class Projection:
  """The inputs of a vocabulary projection: logits = h @ W (+ bias), W laid out [V, D]
  (an embedding table, tied heads) when `vocab_major`, else [D, V] (a Dense kernel). The
  matmul takes `dtype` operands and accumulates in float32. `scale`: the logits are
  multiplied by it (Cohere's logit_scale), then with `softcap` become cap * tanh(logits /
  cap) (Gemma 2's final_logit_softcapping); both apply in the loss too."""
  h: Any  # [B, T, D]
  w: Any
  bias: Any = None  # [V] or None
  vocab_major: bool = flax.struct.field(pytree_node=False, default=True)
  dtype: Any = flax.struct.field(pytree_node=False, default=jnp.float32)
  softcap: float | None = flax.struct.field(pytree_node=False, default=None)
  scale: float | None = flax.struct.field(pytree_node=False, default=None)

  @classmethod
  def of_dense(cls, dense, h) -> "Projection":
    """The projection a bias-free or biased layers.linear.Dense would compute."""
    if not hasattr(dense, "kernel"):  # a swapped-in layer (compress.quantize) builds its own
      return dense.projection(h)
    bias = None if dense.bias is None else dense.bias[...]
    return cls(h, dense.kernel[...], bias, vocab_major=False, dtype=dense.dtype)

  def logits(self):
    """The full float32 logits [B, T, V]."""
    out = matmul(self.h, self.w, self.dtype, transpose_w=self.vocab_major)
    return head_logits(out, self.bias, self.scale, self.softcap)


def head_logits(out, bias, scale: float | None, softcap: float | None):
  """A vocabulary projection's float32 products -> the head's logits: plus `bias`, times
  `scale`, then soft-capped (Projection; the quantized head's QuantProjection too)."""
  out = out if bias is None else out + bias.astype(jnp.float32)
  return apply_softcap(out if scale is None else out * scale, softcap)


def cross_entropy_sums(proj: Projection, targets_BT, weights_BT):
  """(Σ weights·NLL, Σ weights·hit) of `targets_BT` under softmax(proj.logits()): the
  summed loss, differentiable in h, W and bias, and the hits (not differentiable)."""
  B, T, _ = proj.h.shape
  V = proj.w.shape[0] if proj.vocab_major else proj.w.shape[1]
  chunk = max(1, min(T, max(CHUNK_LOGITS // max(1, B * V), -(-T // MAX_CHUNKS))))
  has_bias = proj.bias is not None
  bias = proj.bias if has_bias else jnp.zeros((0,), jnp.float32)
  static = (proj.vocab_major, jnp.dtype(proj.dtype), chunk, has_bias,
            proj.softcap, proj.scale)
  return _fused(static, proj.h, proj.w, bias, targets_BT, weights_BT.astype(jnp.float32))


def _chunks(static, T):
  chunk = static[2]
  return [(t, min(t + chunk, T)) for t in range(0, T, chunk)]


def _chunk_stats(static, h_BCD, w, bias_V, targets_BC, weights_BC, grads: bool):
  """Loss and hit sums of one chunk and, if `grads`, d(loss sum)/d(logits) [B*C, V]."""
  vocab_major, dtype, cap, scale = static[0], static[1], static[4], static[5]
  B, C, D = h_BCD.shape
  h_ND = h_BCD.reshape(B * C, D).astype(dtype)
  logits_NV = _product(h_ND, w, transpose_w=vocab_major)  # h @ W_DV
  if bias_V is not None:
    logits_NV = logits_NV + bias_V
  if scale is not None:
    logits_NV = logits_NV * scale
  if cap is not None:
    tanh_NV = jnp.tanh(logits_NV / cap)
    logits_NV = cap * tanh_NV
  t_N, wt_N = targets_BC.reshape(-1), weights_BC.reshape(-1)
  max_N = jnp.max(logits_NV, axis=-1)
  shifted_NV = logits_NV - max_N[:, None]
  exp_NV = jnp.exp(shifted_NV)
  sum_N = exp_NV.sum(-1)
  target_N = jnp.take_along_axis(shifted_NV, t_N[:, None], axis=-1)[:, 0]
  nll_N = jnp.log(sum_N) - target_N
  sums = ((nll_N * wt_N).sum(), ((target_N >= 0) * wt_N).sum())
  if not grads:
    return sums, None, h_ND
  onehot_NV = jax.nn.one_hot(t_N, logits_NV.shape[-1], dtype=jnp.float32)
  dlogits_NV = (exp_NV / sum_N[:, None] - onehot_NV) * wt_N[:, None]
  if cap is not None:  # through cap * tanh(l / cap): times 1 - tanh^2
    dlogits_NV = dlogits_NV * (1.0 - jnp.square(tanh_NV))
  if scale is not None:  # through logits * scale
    dlogits_NV = dlogits_NV * scale
  return sums, dlogits_NV, h_ND


def _forward(static, h_BTD, w, bias, targets_BT, weights_BT, grads: bool):
  vocab_major, dtype, _, has_bias = static[:4]
  w = w.astype(dtype)
  bias_V = bias.astype(jnp.float32) if has_bias else None
  B, T, D = h_BTD.shape
  nll = hits = jnp.zeros((), jnp.float32)
  dh, dw_DV, db = [], None, None
  for t0, t1 in _chunks(static, T):
    (nll_c, hits_c), dl_NV, h_ND = _chunk_stats(
        static, h_BTD[:, t0:t1], w, bias_V, targets_BT[:, t0:t1], weights_BT[:, t0:t1], grads)
    nll, hits = nll + nll_c, hits + hits_c
    if not grads:
      continue
    dl = dl_NV.astype(dtype)  # bf16 cotangents keep both matmuls on the fast path
    # dlogits @ W_DV^T, with W read in place in either layout.
    dh.append(_product(dl, w, transpose_w=not vocab_major).reshape(B, t1 - t0, D))
    # h^T @ dlogits: [D, V] with the small operand transposed, never [V, N].
    dw_c = jnp.matmul(materialize(h_ND.T), dl, preferred_element_type=jnp.float32)
    dw_DV = dw_c if dw_DV is None else dw_DV + dw_c
    if bias_V is not None:
      db_c = dl_NV.sum(0)
      db = db_c if db is None else db + db_c
  if not grads:
    return (nll, hits), None
  dh_BTD = dh[0] if len(dh) == 1 else jnp.concatenate(dh, axis=1)
  # The transpose to [V, D] on its own: fused with the sums above it ran 8x slower.
  dw = materialize(materialize(dw_DV).T) if vocab_major else dw_DV
  return (nll, hits), (dh_BTD, dw, db)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(static, h_BTD, w, bias, targets_BT, weights_BT):
  return _forward(static, h_BTD, w, bias, targets_BT, weights_BT, grads=False)[0]


def _fused_fwd(static, h_BTD, w, bias, targets_BT, weights_BT):
  sums, grads = _forward(static, h_BTD, w, bias, targets_BT, weights_BT, grads=True)
  carriers = (jnp.zeros((0,), h_BTD.dtype), jnp.zeros((0,), w.dtype), jnp.zeros_like(bias))
  return sums, (grads, carriers, targets_BT, weights_BT)


def _fused_bwd(static, res, g):
  (dh, dw, db), (h_like, w_like, bias_zero), targets, weights = res
  g_nll = g[0]
  d_bias = bias_zero if db is None else (g_nll * db).astype(bias_zero.dtype)
  # Integer targets take a float0 cotangent; the loss weights are data, not parameters.
  d_targets = np.zeros(targets.shape, jax.dtypes.float0)
  return ((g_nll * dh).astype(h_like.dtype), (g_nll * dw).astype(w_like.dtype), d_bias,
          d_targets, jnp.zeros_like(weights))


_fused.defvjp(_fused_fwd, _fused_bwd)
