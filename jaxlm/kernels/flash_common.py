"""Pieces shared by the flash-attention forward and backward kernels.

Everything a kernel needs to know about a call lives in one hashable `FlashConfig`
(it is the static, non-differentiable argument of the custom VJP). The block-range
functions decide, from block indices alone, which key blocks a query block can see
(and vice versa for the dK/dV kernel): loops run only over that range, so blocks above
the causal diagonal or outside the sliding window are never loaded or multiplied.
Within the range, blocks that are entirely visible skip the mask arithmetic too.

Conventions used by all kernels:
  * Logits live in base 2: s = q.k * sm_scale * log2(e) (+ slope * log2(e) * (j - i)),
    so the softmax uses exp2; the saved log-sum-exp `lse` is in the same base. With a
    soft cap c the natural logit is first squashed, c * tanh(q.k * sm_scale / c), and
    the backward multiplies dS by its derivative 1 - tanh^2.
  * Query i sits at key position i + (Tk - Tq) (queries are aligned to the end of
    the keys, as `jaxlm.layers.attention.causal_mask`).
  * Row statistics (lse, delta) are f32 arrays [B, H, T_pad, 1]; padded query rows and
    rows with no visible key get lse = +inf, so every recomputed probability is 0.
  * Two layouts: sequence-major [B, T, H, D] (GPU / interpret; no transposes needed)
    and heads-major [B, H, T, D] (TPU, where the last two block dims must be (T, D)).
    Kernels only ever see 2-D [rows, D] tiles, so the body is layout-agnostic.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

LOG2E = math.log2(math.e)
NEG_INF = float("-inf")
POS_INF = float("inf")


@dataclasses.dataclass(frozen=True)
class FlashConfig:
  """Static description of one flash-attention call (hashable)."""

  tq: int  # real query length
  tk: int  # real key length
  tq_pad: int  # padded lengths: multiples of every block size along that axis
  tk_pad: int
  num_q_heads: int
  num_kv_heads: int
  head_dim: int  # (padded) head dim of the arrays the kernels see
  sm_scale: float
  causal: bool
  window: int | None
  has_segments: bool
  has_alibi: bool
  softcap: float | None  # logits -> softcap * tanh(logits / softcap) (Gemma 2)
  block_q: int  # forward
  block_k: int
  block_q_dq: int  # dQ kernel
  block_k_dq: int
  block_q_dkv: int  # dK/dV kernel
  block_k_dkv: int
  backend: str  # "gpu" | "tpu" | "interpret"
  heads_major: bool
  num_warps: int | None = None
  num_stages: int | None = None
  count_visits: bool = False  # debug: kernels also return per-program block-visit counts

  @property
  def offset(self) -> int:
    return self.tk - self.tq

  @property
  def group(self) -> int:
    return self.num_q_heads // self.num_kv_heads

  @property
  def interpret(self) -> bool:
    return self.backend == "interpret"

  def precision(self, dtype):
    # f32 inputs ask for full f32 matmuls (no TF32 / bf16 passes); bf16 uses the MXU/MMA.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# ---- block ranges ---------------------------------------------------------------------
# Numerators are clamped to >= 0 before dividing, so truncating division (the only kind
# the GPU/TPU lowerings take on scalars) equals floor division. Work on Python ints too.
def _is_static(*xs) -> bool:
  return all(isinstance(x, int) for x in xs)


def _i32(x):
  # Explicit int32 on traced paths: Triton rejects a min/max/select whose operands lower
  # to different integer types, which weakly typed Python ints can (seen on an H200).
  return jnp.asarray(x, jnp.int32)


def _div(x, n: int):
  return x // n if _is_static(x) else lax.div(_i32(x), jnp.int32(n))


def _max(x, y):
  return max(x, y) if _is_static(x, y) else jnp.maximum(_i32(x), _i32(y))


def _min(x, y):
  return min(x, y) if _is_static(x, y) else jnp.minimum(_i32(x), _i32(y))


def _floor_div_pos(x, n):  # floor(x / n) clamped at 0
  return _div(_max(x, 0), n)


def _ceil_div_pos(x, n):  # ceil(x / n) clamped at 0
  return _div(_max(x, 0) + n - 1, n)


def _end_div(x, n):  # floor(x / n) + 1 clamped at 0: blocks [0, end) reach position x
  return _div(_max(x, -1) + n, n)


def _where(c, x, y):
  return (x if c else y) if _is_static(c, x, y) else jnp.where(c, _i32(x), _i32(y))


def _finish(lo, a, b, hi, empty, has_segments):
  """Clamps to lo <= a <= b <= hi. Masked blocks: [lo, a) and [b, hi); full: [a, b)."""
  hi = _where(empty, lo, _max(hi, lo))
  if has_segments:  # any block may hold a segment boundary: mask them all
    a = b = hi
  a = _min(_max(a, lo), hi)
  b = _min(_max(b, a), hi)
  return lo, a, b, hi


def kv_block_range(qi, cfg: FlashConfig, bq: int, bk: int):
  """Key blocks that query block `qi` sees: (lo, a, b, hi), see `_finish`.

  Block kb is full when every (real query, key) pair in it is visible and it holds no
  padded key; it is in [lo, hi) when at least one such pair is visible.
  """
  w = cfg.window
  p0 = qi * bq + cfg.offset  # first query position of the block (always a real row)
  p1 = _min(qi * bq + bq - 1, cfg.tq - 1) + cfg.offset  # last real query position
  nk = -(-cfg.tk // bk)  # blocks holding at least one real key
  lo = _floor_div_pos(p0 - w + 1, bk) if w is not None else 0
  if cfg.causal:
    hi = _min(_end_div(p1, bk), nk)
    b = _floor_div_pos(p0 + 1, bk)
  elif w is not None:  # symmetric local window |i - j| < w
    hi = _min(_end_div(p1 + w - 1, bk), nk)
    b = _floor_div_pos(p0 + w, bk)
  else:
    hi, b = nk, nk
  b = _min(b, cfg.tk // bk)
  a = _ceil_div_pos(p1 - w + 1, bk) if w is not None else lo
  return _finish(lo, a, b, hi, qi * bq >= cfg.tq, cfg.has_segments)


def q_block_range(kb, cfg: FlashConfig, bq: int, bk: int):
  """Query blocks that see key block `kb` (for dK/dV): (lo, a, b, hi), see `_finish`.

  Here a full block must have every pair visible including padded query rows (their
  lse is +inf, so they contribute nothing either way).
  """
  w, off = cfg.window, cfg.offset
  k0 = kb * bk
  k1 = _min(k0 + bk - 1, cfg.tk - 1)  # last real key of the block
  nq = -(-cfg.tq // bq)
  if cfg.causal:
    lo = _floor_div_pos(k0 - off, bq)
    a = _ceil_div_pos(k0 + bk - 1 - off, bq)
  elif w is not None:
    lo = _floor_div_pos(k0 - w + 1 - off, bq)
    a = _ceil_div_pos(k0 + bk - off - w, bq)
  else:
    lo, a = 0, 0
  if w is not None:
    hi = _min(_end_div(k1 + w - 1 - off, bq), nq)
    b = _floor_div_pos(k0 + w - off, bq)
  else:
    hi, b = nq, nq
  b = _where(k0 + bk <= cfg.tk, b, a)  # a block holding padded keys is always masked
  return _finish(lo, a, b, hi, k0 >= cfg.tk, cfg.has_segments)


def run_blocks(lo, a, b, hi, step, carry):
  """Runs step(block, carry, masked) over [lo, a) masked, [a, b) full, [b, hi) masked."""
  carry = lax.fori_loop(lo, a, lambda i, c: step(i, c, True), carry)
  carry = lax.fori_loop(a, b, lambda i, c: step(i, c, False), carry)
  return lax.fori_loop(b, hi, lambda i, c: step(i, c, True), carry)


# ---- in-kernel math -------------------------------------------------------------------
def dot_nt(x, y, cfg):
  """x [m, d] @ y[n, d]^T -> f32 [m, n]."""
  return lax.dot_general(x, y, (((1,), (1,)), ((), ())), precision=cfg.precision(x.dtype),
                         preferred_element_type=jnp.float32)


def dot_nn(x, y, cfg):
  """x [m, n] @ y[n, d] -> f32 [m, d]."""
  return lax.dot_general(x, y, (((1,), (0,)), ((), ())), precision=cfg.precision(x.dtype),
                         preferred_element_type=jnp.float32)


def dot_tn(x, y, cfg):
  """x[m, n]^T @ y [m, d] -> f32 [n, d]."""
  return lax.dot_general(x, y, (((0,), (0,)), ((), ())), precision=cfg.precision(x.dtype),
                         preferred_element_type=jnp.float32)


def positions(start, n: int, axis: int):
  """Positions start..start+n-1 as a column [n, 1] (axis 0) or a row [1, n] (axis 1)."""
  shape = (n, 1) if axis == 0 else (1, n)
  return start + lax.broadcasted_iota(jnp.int32, shape, axis)


def logits(q, k, q_pos, k_pos, slope, cfg: FlashConfig):
  """(base-2 logits [bq, bk] in f32, d logits / d uncapped logits or None without a soft
  cap); `slope` [1, 1] is the head's ALiBi slope * log2(e)."""
  dcap = None
  if cfg.softcap is None:
    s = dot_nt(q, k, cfg) * (cfg.sm_scale * LOG2E)
  else:
    t = jnp.tanh(dot_nt(q, k, cfg) * (cfg.sm_scale / cfg.softcap))
    s = t * (cfg.softcap * LOG2E)
    dcap = 1.0 - t * t
  if slope is not None:
    # ALiBi proper, slope * (j - i); jaxlm's `alibi_bias` (slope * j) differs from it by a
    # per-row constant, which softmax ignores.
    s = s + slope * (k_pos - q_pos).astype(jnp.float32)
  return s, dcap


def visible(q_pos, k_pos, q_seg, k_seg, cfg: FlashConfig):
  """Boolean [bq, bk]: real key, causal / window, and same non-zero segment."""
  ok = k_pos < cfg.tk
  if cfg.causal:
    ok = ok & (q_pos >= k_pos)
  if cfg.window is not None:
    ok = ok & (q_pos - k_pos < cfg.window)
    if not cfg.causal:
      ok = ok & (k_pos - q_pos < cfg.window)
  if q_seg is not None:
    ok = ok & (q_seg == k_seg) & (k_seg != 0)
  return ok


def counts_tile(n_rows: int, visits, masked):
  """[n_rows, 2] int32 tile: column 0 = blocks visited, column 1 = of those, masked."""
  col = lax.broadcasted_iota(jnp.int32, (n_rows, 2), 1)
  return jnp.where(col == 0, visits, masked).astype(jnp.int32)


# ---- BlockSpecs and grids -------------------------------------------------------------
def grid_bhn(cfg: FlashConfig, batch: int, heads: int, n: int):
  """Grid over (batch, head, block) and the map grid indices -> (b, h, block).

  TPU: block index innermost, so the full-length K/V (or Q) tiles stay resident across
  consecutive steps. GPU: block index first (CUDA's fastest axis), so neighbouring
  programs share one head's K/V in L2.
  """
  if cfg.heads_major:
    return (batch, heads, n), (lambda b, h, i: (b, h, i)), 2
  return (n, batch, heads), (lambda i, b, h: (b, h, i)), 0


def seq_spec(cfg: FlashConfig, block_t: int, ids, head=lambda h: h):
  """[block_t, D] tile of a q/k/v-like array; ids(*grid) -> (b, h, t-block)."""
  D = cfg.head_dim
  if cfg.heads_major:
    return pl.BlockSpec((None, None, block_t, D),
                        lambda *g: (ids(*g)[0], head(ids(*g)[1]), ids(*g)[2], 0))
  return pl.BlockSpec((None, block_t, None, D),
                      lambda *g: (ids(*g)[0], ids(*g)[2], head(ids(*g)[1]), 0))


def grouped_seq_spec(cfg: FlashConfig, length: int, ids):
  """All G query heads of KV head h, full length: a 5-D view [B, Hkv, G, T, D] (heads-
  major) or [B, T, Hkv, G, D] (sequence-major) of the q-like array."""
  D, G = cfg.head_dim, cfg.group
  if cfg.heads_major:
    return pl.BlockSpec((None, None, G, length, D), lambda *g: (ids(*g)[0], ids(*g)[1], 0, 0, 0))
  return pl.BlockSpec((None, length, None, G, D), lambda *g: (ids(*g)[0], 0, ids(*g)[1], 0, 0))


def grouped_rows(ref, cfg: FlashConfig, g, start, n: int):
  """Rows start..start+n-1 of query head g from a `grouped_seq_spec` tile: [n, D]."""
  if cfg.heads_major:
    return ref[g, pl.ds(start, n), :]
  return ref[pl.ds(start, n), g, :]


def stats_spec(block_t: int, ids, width: int = 1):
  """[block_t, width] tile of a [B, H, T, width] row-statistics array."""
  return pl.BlockSpec((None, None, block_t, width),
                      lambda *g: (ids(*g)[0], ids(*g)[1], ids(*g)[2], 0))


def compiler_params(cfg: FlashConfig, num_grid_dims: int = 3):
  if cfg.backend == "gpu":
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
  if cfg.backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    # Every grid step writes its own output tile: all axes are parallel (megacore).
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * num_grid_dims)
  return None


def to_stats(x_BHT):
  """[B, H, T] -> [B, H, T, 1] row statistics."""
  return x_BHT[..., None]


def as_grouped_stats(x_BHT1, cfg: FlashConfig):
  """[B, Hq, T, 1] -> [B, Hkv, G, T, 1] (free reshape)."""
  B, _, T, w = x_BHT1.shape
  return x_BHT1.reshape(B, cfg.num_kv_heads, cfg.group, T, w)


def as_grouped_seq(x, cfg: FlashConfig):
  """q-like array -> the 5-D view `grouped_seq_spec` expects (free reshape)."""
  if cfg.heads_major:
    B, _, T, D = x.shape
    return x.reshape(B, cfg.num_kv_heads, cfg.group, T, D)
  B, T, _, D = x.shape
  return x.reshape(B, T, cfg.num_kv_heads, cfg.group, D)


def query_block_inputs(cfg: FlashConfig, bq: int, ids, q, k, v, q_seg, kv_seg, slopes):
  """(in_specs, args) of a kernel with one program per query block (forward, dq): its q
  block, the whole K/V of its KV head (query head h reads KV head h // group), and the
  optional segment ids and ALiBi slope."""
  kv_head = lambda h: h // cfg.group  # noqa: E731
  whole_kv = lambda *g: (*ids(*g)[:2], 0)  # noqa: E731
  in_specs = [seq_spec(cfg, bq, ids), seq_spec(cfg, cfg.tk_pad, whole_kv, kv_head),
              seq_spec(cfg, cfg.tk_pad, whole_kv, kv_head)]
  args = [q, k, v]
  if cfg.has_segments:
    in_specs += [pl.BlockSpec((None, bq, 1), lambda *g: (ids(*g)[0], ids(*g)[2], 0)),
                 pl.BlockSpec((None, 1, cfg.tk_pad), lambda *g: (ids(*g)[0], 0, 0))]
    args += [q_seg, kv_seg]
  if cfg.has_alibi:
    in_specs.append(pl.BlockSpec((None, 1, 1), lambda *g: (ids(*g)[1], 0, 0)))
    args.append(slopes)
  return in_specs, args
