"""Sparse mixture of experts: a router picks top-k of E expert MLPs per token (Mixtral).

  logits = x @ router;  p = softmax(logits) (f32);  (w, e) = top_k(p);  w /= |w|_p
  (p = 1: the sum, as Mixtral; DBRX may use another p, or none)
  y = sum_j w_j * expert_{e_j}(x)         expert(x) = down(act(gate x) * up x)  (or plain)

Experts are stacked parameters ([E, D, F] gate/up, [E, F, D] down), and tokens reach them
without a Python loop over experts: the N*k token slots are laid out as rows grouped by
expert, in blocks that each belong to one expert (one gather in, one gather out, with
gathers as gradients too), and each projection is one grouped matmul:

- dropless (capacity_factor None): each expert's run of rows is padded to a multiple of a
  small block (128 rows), so no slot is ever dropped; the static row count covers the
  worst case (S + E * (block - 1) rows for S slots). `ragged_matmul` walks the used blocks
  in a `lax.while_loop`, one 2-D matmul per chunk of up to 8 blocks of one expert, so
  padding blocks are never multiplied and the weights are never copied per block.
- capacity (capacity_factor f): one block of C = ceil(f * k * N / E) rows per expert,
  shapes [E, C, D] that shard over an expert axis (`expert_matmul`, a batched matmul);
  slots past C are dropped (contribute 0). First choices take precedence over second
  choices, then earlier tokens (as in GShard/Switch).

Measured on this CPU (benchmarks/moe.py, fwd+bwd against a dense MLP with the same active
parameters): `jax.lax.ragged_dot` lowers to a masked dense matmul per expert (E x the
FLOPs; 6-17x the dense MLP); one batched matmul over all blocks, with per-block weight
copies and per-block weight gradients, 1.5-1.8x in bf16; the while-loop chunks here
0.8-1.2x.

Router statistics (the logits and the chosen experts of a layer's last call) go to a side
table keyed weakly by the layer, and `pop_router_stats` takes them out again;
`jaxlm.models.base.router_outputs` does that at the end of each model forward. Not
`Module.sow`: that mutates the module, which NNX refuses when the model runs inside a jax
transform nested below the one that built it (greedy decoding in a `fori_loop`), and
whatever a forward leaves on the module breaks `nnx.split(model, nnx.Param)`. The losses
(load balancing exactly as transformers' `load_balancing_loss_func`, z-loss, expert
fractions) are computed over all layers at once by `router_losses`.
"""

from __future__ import annotations

import functools
import math
import weakref

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.activations import get_activation
from jaxlm.layers.linear import Dense, normal_init

f32 = jnp.float32


# ---- routing --------------------------------------------------------------------------
def route(logits_NE, top_k: int, norm_p: float | None = 1.0):
  """Softmax in f32, top-k, and the weights divided by their p-norm (`norm_p`; 1.0 is
  Mixtral's sum, None leaves them as probabilities). Returns (w_NK, idx_NK)."""
  probs_NE = jax.nn.softmax(logits_NE.astype(f32), axis=-1)
  w_NK, idx_NK = jax.lax.top_k(probs_NE, top_k)
  if norm_p is None:
    return w_NK, idx_NK
  if norm_p == 1.0:  # weights are positive: the 1-norm is the sum
    norm_N1 = w_NK.sum(-1, keepdims=True)
  elif norm_p == 2.0:
    norm_N1 = jnp.sqrt(jnp.square(w_NK).sum(-1, keepdims=True))
  else:
    norm_N1 = jnp.power(jnp.power(w_NK, norm_p).sum(-1, keepdims=True), 1.0 / norm_p)
  return w_NK / norm_N1, idx_NK


# ---- layouts: where each token slot (n, j) goes in the expert-grouped rows -----------------
def dropless_layout(idx_NK, num_experts: int, block: int):
  """Slots sorted by expert (token order within an expert), each expert's run padded to a
  multiple of `block`. Returns (pos_S, num_rows, expert_G): S = N*k slots in token-major
  order, G = num_rows / block blocks, and E for the unused blocks at the end."""
  E, S = num_experts, idx_NK.size
  e_S = idx_NK.reshape(-1)
  onehot_SE = (e_S[:, None] == jnp.arange(E)).astype(jnp.int32)
  rank_S = jnp.take_along_axis(jnp.cumsum(onehot_SE, 0), e_S[:, None], 1)[:, 0] - 1
  padded_E = (onehot_SE.sum(0) + block - 1) // block * block
  end_E = jnp.cumsum(padded_E)
  pos_S = (end_E - padded_E)[e_S] + rank_S
  G = (S + E * (block - 1)) // block  # the most blocks any routing can need
  expert_G = jnp.searchsorted(end_E // block, jnp.arange(G), side="right")
  return pos_S, G * block, expert_G.astype(jnp.int32)


def capacity_layout(idx_NK, num_experts: int, capacity: int):
  """[E, C] rows; a slot's rank among its expert's slots orders first choices before
  second choices, then tokens; rank >= C is dropped (pos = E*C, past the last row)."""
  E, C = num_experts, capacity
  N, K = idx_NK.shape
  e_S = idx_NK.T.reshape(-1)  # choice-major priority
  onehot_SE = (e_S[:, None] == jnp.arange(E)).astype(jnp.int32)
  rank_S = jnp.take_along_axis(jnp.cumsum(onehot_SE, 0), e_S[:, None], 1)[:, 0] - 1
  pos_S = jnp.where(rank_S < C, e_S * C + rank_S, E * C)
  return pos_S.reshape(K, N).T.reshape(-1), E * C, jnp.arange(E, dtype=jnp.int32)


def capacity(capacity_factor: float, num_tokens: int, num_experts: int, top_k: int) -> int:
  # An expert receives each token at most once, so more than N rows is never needed.
  return max(1, min(num_tokens, math.ceil(capacity_factor * top_k * num_tokens / num_experts)))


# ---- permutations whose gradients are gathers too (XLA:CPU scatters are slow) -------------
def _rows_of(pos_S, num_rows: int):
  """Inverse of pos: the slot in each row, or S for padding rows."""
  S = pos_S.shape[0]
  return jnp.full((num_rows,), S, jnp.int32).at[pos_S].set(
      jnp.arange(S, dtype=jnp.int32), mode="drop")


def _with_zero_row(a):
  return jnp.concatenate([a, jnp.zeros((1,) + a.shape[1:], a.dtype)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def dispatch(x_ND, pos_S, slot_R, top_k):
  """Token rows in expert-grouped order [R, D]; zeros in padding rows."""
  N = x_ND.shape[0]
  S = pos_S.shape[0]
  return _with_zero_row(x_ND)[jnp.where(slot_R < S, slot_R // top_k, N)]


def _dispatch_fwd(x_ND, pos_S, slot_R, top_k):
  return dispatch(x_ND, pos_S, slot_R, top_k), (pos_S, slot_R)


def _dispatch_bwd(top_k, res, g_RD):
  pos_S, _ = res
  # Each token's gradient is the sum over its k rows (dropped slots point at the zero row).
  g_SD = _with_zero_row(g_RD)[pos_S].astype(f32)
  return g_SD.reshape(-1, top_k, g_RD.shape[1]).sum(1).astype(g_RD.dtype), None, None


dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def combine(y_RD, pos_S, slot_R):
  """Per-slot outputs [S, D] from the expert rows (zeros for dropped slots)."""
  return _with_zero_row(y_RD)[pos_S]


def _combine_fwd(y_RD, pos_S, slot_R):
  return combine(y_RD, pos_S, slot_R), (pos_S, slot_R)


def _combine_bwd(res, g_SD):
  pos_S, slot_R = res
  return _with_zero_row(g_SD)[slot_R], None, None


combine.defvjp(_combine_fwd, _combine_bwd)


# ---- grouped matmuls: operands in `dtype`, f32 accumulation --------------------------------
# Both have custom gradients: the cotangent is cast to `dtype` so bf16 backward matmuls stay
# on the fast (AMX) path, and every dot is written with explicitly transposed operands
# (XLA:CPU has no bf16 kernel for the batched dot with a transposed left operand that
# autodiff would emit).
CHUNK_BLOCKS = 8  # a dropless matmul covers up to this many consecutive blocks of one expert


def _dot(a, b):
  return jnp.matmul(a, b, preferred_element_type=f32)


def _carriers(x, w):
  """Zero-size residuals that carry the input dtypes (residuals must be arrays)."""
  return jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def expert_matmul(x_ECI, w_EIO, dtype):
  """Capacity layout: y[e] = x[e] @ w[e], one batched matmul over the expert axis."""
  return jnp.einsum("eci,eio->eco", x_ECI.astype(dtype), w_EIO.astype(dtype),
                    preferred_element_type=f32)


def _expert_fwd(x_ECI, w_EIO, dtype):
  x_, w_ = x_ECI.astype(dtype), w_EIO.astype(dtype)
  return (jnp.einsum("eci,eio->eco", x_, w_, preferred_element_type=f32),
          (x_, w_, _carriers(x_ECI, w_EIO)))


def _expert_bwd(dtype, res, g_ECO):
  x_ECI, w_EIO, (x_like, w_like) = res
  g_ECO = g_ECO.astype(dtype)
  # (A transposed right operand is fine, and 2x faster here than materializing w^T.)
  dx = jnp.einsum("eco,eio->eci", g_ECO, w_EIO, preferred_element_type=f32)
  dw = jnp.einsum("eic,eco->eio", jnp.swapaxes(x_ECI, 1, 2), g_ECO, preferred_element_type=f32)
  return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


expert_matmul.defvjp(_expert_fwd, _expert_bwd)


def _over_runs(expert_G, num_experts: int, chunk: int, step, update, init):
  """A while loop over the used blocks (expert_G < E) in order, `chunk` consecutive blocks
  of one expert at a time (fewer at the end of an expert's run): state = update(g, e,
  state, step[n](g, e)) for a chunk of n blocks starting at block g. Each step is one
  2-D matmul with a static shape (a switch over n), so padding is never multiplied."""
  G = expert_G.shape[0]
  run_end_G = jnp.searchsorted(expert_G, expert_G, side="right").astype(jnp.int32)
  branches = [functools.partial(step, n) for n in range(1, chunk + 1)]

  def cond(carry):
    g = carry[0]
    return (g < G) & (expert_G[jnp.minimum(g, G - 1)] < num_experts)

  def body(carry):
    g, state = carry
    n = jnp.minimum(chunk, run_end_G[g] - g)
    e = expert_G[g]
    return g + n, update(g, e, state, jax.lax.switch(n - 1, branches, g, e))

  return jax.lax.while_loop(cond, body, (jnp.int32(0), init))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def ragged_matmul(x_RI, w_EIO, expert_G, block: int, dtype):
  """Dropless layout: rows in blocks of `block`; block g's rows times w[expert_G[g]], and
  zero rows for unused blocks (expert_G == E)."""
  return _ragged_fwd(x_RI, w_EIO, expert_G, block, dtype)[0]


def _ragged_fwd(x_RI, w_EIO, expert_G, block, dtype):
  x_, w_ = x_RI.astype(dtype), w_EIO.astype(dtype)
  R, O = x_.shape[0], w_.shape[2]
  m = min(CHUNK_BLOCKS, expert_G.shape[0])

  def step(n, g, e):
    y = _dot(jax.lax.dynamic_slice_in_dim(x_, g * block, n * block), w_[e])
    return jnp.pad(y, ((0, (m - n) * block), (0, 0)))  # one shape for every branch

  def update(g, e, y, out):
    # Rows past the chunk get zeros here and their own values when the loop reaches them;
    # the buffer has m blocks of slack so the window never runs off the end.
    return jax.lax.dynamic_update_slice_in_dim(y, out, g * block, 0)

  y = _over_runs(expert_G, w_.shape[0], m, step, update, jnp.zeros((R + m * block, O), f32))
  return y[:R], (x_, w_, expert_G, _carriers(x_RI, w_EIO))


def _ragged_bwd(block, dtype, res, g_RO):
  x_RI, w_EIO, expert_G, (x_like, w_like) = res
  R, I = x_RI.shape
  m = min(CHUNK_BLOCKS, expert_G.shape[0])
  g_RO = g_RO.astype(dtype)
  w_EOI, x_IR = jnp.swapaxes(w_EIO, 1, 2), x_RI.T

  def step(n, g, e):
    g_nO = jax.lax.dynamic_slice_in_dim(g_RO, g * block, n * block)
    dx = _dot(g_nO, w_EOI[e])
    dw = _dot(jax.lax.dynamic_slice_in_dim(x_IR, g * block, n * block, axis=1), g_nO)
    return jnp.pad(dx, ((0, (m - n) * block), (0, 0))), dw

  def update(g, e, state, out):
    dx_RI, dw_EIO = state
    return (jax.lax.dynamic_update_slice_in_dim(dx_RI, out[0], g * block, 0),
            dw_EIO.at[e].add(out[1]))

  dx, dw = _over_runs(expert_G, w_EIO.shape[0], m, step, update,
                      (jnp.zeros((R + m * block, I), f32), jnp.zeros(w_EIO.shape, f32)))
  return dx[:R].astype(x_like.dtype), dw.astype(w_like.dtype), None


ragged_matmul.defvjp(_ragged_fwd, _ragged_bwd)


# ---- the layer --------------------------------------------------------------------------
# MoE layer -> (logits_NE, idx_NK) of its last call. Weak keys: an entry goes with its layer
# (jax.jit + nnx.merge builds a fresh model per trace).
_ROUTER_STATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class MoE(nnx.Module):
  """Top-k routed mixture of E MLPs; each expert has the block's dense MLP shape.

  Parameters: `router` (Dense D->E, no bias), `gate` [E, D, F] (gated MLPs only), `up`
  [E, D, F], `down` [E, F, D], and with `use_bias` `gate_bias`/`up_bias` [E, F] and
  `down_bias` [E, D]. The router runs in float32 whatever `dtype` is: top-k choices are
  discontinuous, and bf16 logits would flip them for near-ties.

  Each call replaces the layer's entry in the router-statistics table (nothing
  accumulates); `pop_router_stats` reads and removes it.
  """

  def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int,
               top_k: int, *, activation: str = "silu", gated: bool = True,
               use_bias: bool = False, capacity_factor: float | None = None,
               norm_p: float | None = 1.0, block_size: int = 128, init_std: float = 0.02,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    E, D, F = num_experts, hidden_size, intermediate_size
    self.num_experts, self.top_k = E, top_k
    self.capacity_factor, self.block_size = capacity_factor, block_size
    self.norm_p = norm_p  # the top-k weights' renormalization (see route)
    self.dtype = dtype
    self.router = Dense(D, E, use_bias=False, init_std=init_std, dtype=jnp.float32,
                        param_dtype=param_dtype, rngs=rngs)
    init = normal_init(init_std)

    # `axes`: logical dimension names for sharding (jaxlm.parallel.rules); experts shard
    # over the "expert" mesh axis.
    def param(shape, axes):
      return nnx.Param(init(rngs.params(), shape, param_dtype), axes=axes)

    def bias(shape, axes):
      return nnx.Param(jnp.zeros(shape, param_dtype), axes=axes) if use_bias else None

    self.gate = param((E, D, F), ("expert", "embed", "mlp")) if gated else None
    self.up = param((E, D, F), ("expert", "embed", "mlp"))
    self.down = param((E, F, D), ("expert", "mlp", "embed"))
    self.gate_bias = bias((E, F), ("expert", "mlp")) if gated else None
    self.up_bias = bias((E, F), ("expert", "mlp"))
    self.down_bias = bias((E, D), ("expert", "embed"))
    self.act = get_activation(activation)

  def layout(self, idx_NK):
    """(pos_S, rows, expert_G, block) for this call's routing."""
    N, K = idx_NK.shape
    E = self.num_experts
    if self.capacity_factor is not None:
      C = capacity(self.capacity_factor, N, E, K)
      return (*capacity_layout(idx_NK, E, C), C)
    # Small inputs get small blocks, so padding stays a small share of the rows.
    block = min(self.block_size, max(8, 1 << max(0, math.ceil(math.log2(N * K / E)))))
    return (*dropless_layout(idx_NK, E, block), block)

  def __call__(self, x_BTD):
    *lead, D = x_BTD.shape
    x_ND = x_BTD.reshape(-1, D)
    N = x_ND.shape[0]
    logits_NE = self.router(x_ND.astype(jnp.float32))
    w_NK, idx_NK = route(logits_NE, self.top_k, self.norm_p)
    _ROUTER_STATS[self] = (logits_NE, idx_NK)  # for router_outputs; replaces the last call's

    pos_S, R, expert_G, block = self.layout(idx_NK)
    slot_R = _rows_of(pos_S, R)
    x_RD = dispatch(x_ND.astype(self.dtype), pos_S, slot_R, self.top_k)
    G = R // block
    capacity_mode = self.capacity_factor is not None

    def project(h_RI, w, b):
      if capacity_mode:  # [E, C, .] blocks, one per expert: a batched matmul
        y_RO = expert_matmul(h_RI.reshape(G, block, -1), w[...], self.dtype).reshape(R, -1)
      else:
        y_RO = ragged_matmul(h_RI, w[...], expert_G, block, self.dtype)
      if b is not None:  # unused blocks (expert E) get the zero row
        b_GO = _with_zero_row(b[...].astype(f32))[expert_G]
        y_RO = (y_RO.reshape(G, block, -1) + b_GO[:, None, :]).reshape(R, -1)
      return y_RO

    if self.gate is not None:
      h_RF = (self.act(project(x_RD, self.gate, self.gate_bias))
              * project(x_RD, self.up, self.up_bias))
    else:
      h_RF = self.act(project(x_RD, self.up, self.up_bias))
    y_RD = project(h_RF, self.down, self.down_bias)
    y_NKD = combine(y_RD, pos_S, slot_R).reshape(N, self.top_k, D)
    y_ND = jnp.einsum("nkd,nk->nd", y_NKD, w_NK)
    return y_ND.reshape(*lead, D)


# ---- router statistics and losses ---------------------------------------------------------
def pop_router_stats(module: MoE):
  """(logits_NE, idx_NK) of the layer's last call, removed from the table; None if none.
  The values belong to the trace of that call: pop them in the same forward pass."""
  return _ROUTER_STATS.pop(module, None)


def router_losses(layers, num_experts: int, top_k: int) -> dict:
  """ModelOutput MoE fields from per-layer (logits_NE, idx_NK, mask_N or None).

  aux_loss is transformers' `load_balancing_loss_func` over the concatenation of all
  layers: E * sum_e f_e * P_e, where f_e (routed slots per real token) and P_e (mean router
  probability) are averaged over layers x real tokens together, not per layer.
  router_z_loss is the mean over layers x real tokens of logsumexp(logits)^2 (ST-MoE).
  expert_fraction [L, E] is each layer's share of routed slots per expert (rows sum to 1).
  """
  E = num_experts
  counts, probs, rows, z = [], [], [], []
  for logits_NE, idx_NK, mask_N in layers:
    logits_NE = logits_NE.astype(f32)
    m_N = jnp.ones(logits_NE.shape[:1], f32) if mask_N is None else mask_N.astype(f32)
    slots_NE = jax.nn.one_hot(idx_NK, E, dtype=f32).sum(1)
    # Masked sums, not matmuls: exact f32 whatever the backend's default matmul precision.
    counts.append((m_N[:, None] * slots_NE).sum(0))
    probs.append((m_N[:, None] * jax.nn.softmax(logits_NE, axis=-1)).sum(0))
    rows.append(m_N.sum())
    z.append((m_N * jnp.square(jax.nn.logsumexp(logits_NE, axis=-1))).sum())
  counts_LE, rows_L = jnp.stack(counts), jnp.stack(rows)
  total = jnp.maximum(rows_L.sum(), 1.0)  # all-padding input: 0, not NaN
  tokens_per_expert_E = counts_LE.sum(0) / total
  prob_per_expert_E = jnp.stack(probs).sum(0) / total
  return {
      "aux_loss": E * jnp.sum(tokens_per_expert_E * prob_per_expert_E),
      "router_z_loss": jnp.stack(z).sum() / total,
      "expert_fraction": counts_LE / jnp.maximum(top_k * rows_L, 1.0)[:, None],
  }
