"""Flash-attention forward kernel: one program per (batch, query head, query block).

The program keeps its [block_q, D] query tile and walks the key blocks it can see
(`kv_block_range`), holding an online softmax (running max m, running sum l, f32
accumulator) in registers / VMEM. K/V tiles come from the query head's KV head
(h // group), so grouped heads share K/V without repeating them in memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxlm.kernels import flash_common as fc
from jaxlm.kernels.flash_common import FlashConfig


def _fwd_kernel(*refs, cfg: FlashConfig, block_axis: int):
  refs = list(refs)
  q_ref, k_ref, v_ref = refs.pop(0), refs.pop(0), refs.pop(0)
  qseg_ref, kseg_ref = (refs.pop(0), refs.pop(0)) if cfg.has_segments else (None, None)
  slope_ref = refs.pop(0) if cfg.has_alibi else None
  o_ref, lse_ref = refs.pop(0), refs.pop(0)
  cnt_ref = refs.pop(0) if cfg.count_visits else None
  bq, bk = cfg.block_q, cfg.block_k

  qi = pl.program_id(block_axis)
  q = q_ref[...]
  q_pos = fc.positions(qi * bq + cfg.offset, bq, 0)
  q_seg = qseg_ref[...] if qseg_ref is not None else None
  slope = slope_ref[...] if slope_ref is not None else None

  def step(kb, carry, masked):
    acc, m, l, visits, n_masked = carry
    start = pl.multiple_of(kb * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    k_pos = fc.positions(start, bk, 1)
    s, _ = fc.logits(q, k, q_pos, k_pos, slope, cfg)
    if masked:
      k_seg = kseg_ref[:, pl.ds(start, bk)] if kseg_ref is not None else None
      s = jnp.where(fc.visible(q_pos, k_pos, q_seg, k_seg, cfg), s, fc.NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    # A row that has seen only masked keys keeps m = -inf; shifting by 0 instead keeps
    # exp2(-inf - -inf) = NaN out of it (its p and correction are then exactly 0).
    m_safe = jnp.where(m_new == fc.NEG_INF, 0.0, m_new)
    corr = jnp.exp2(m - m_safe)
    p = jnp.exp2(s - m_safe)
    l = corr * l + jnp.sum(p, axis=1, keepdims=True)
    acc = corr * acc + fc.dot_nn(p.astype(v.dtype), v, cfg)
    return acc, m_new, l, visits + 1, n_masked + int(masked)

  carry = (jnp.zeros((bq, cfg.head_dim), jnp.float32), jnp.full((bq, 1), fc.NEG_INF, jnp.float32),
           jnp.zeros((bq, 1), jnp.float32), jnp.int32(0), jnp.int32(0))
  lo, a, b, hi = fc.kv_block_range(qi, cfg, bq, bk)
  acc, m, l, visits, n_masked = fc.run_blocks(lo, a, b, hi, step, carry)

  seen = l > 0.0  # rows with no visible key output 0
  o_ref[...] = (acc / jnp.where(seen, l, 1.0)).astype(o_ref.dtype)
  real_row = fc.positions(qi * bq, bq, 0) < cfg.tq
  lse = m + jnp.log(jnp.where(seen, l, 1.0)) * fc.LOG2E
  lse_ref[...] = jnp.where(seen & real_row, lse, fc.POS_INF)
  if cnt_ref is not None:
    cnt_ref[...] = fc.counts_tile(bq, visits, n_masked)


def flash_forward(q, k, v, q_seg, kv_seg, slopes, cfg: FlashConfig):
  """Padded, layout-converted inputs -> (o like q, lse [B, Hq, Tq_pad, 1] f32[, counts]).

  q_seg [B, Tq_pad, 1] / kv_seg [B, 1, Tk_pad] int32 and slopes [Hq, 1, 1] f32 (already
  times log2(e)) are present iff cfg.has_segments / cfg.has_alibi.
  """
  B, Hq = q.shape[0], cfg.num_q_heads
  bq = cfg.block_q
  grid, ids, axis = fc.grid_bhn(cfg, B, Hq, cfg.tq_pad // bq)
  in_specs, args = fc.query_block_inputs(cfg, bq, ids, q, k, v, q_seg, kv_seg, slopes)
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((B, Hq, cfg.tq_pad, 1), jnp.float32)]
  out_specs = [fc.seq_spec(cfg, bq, ids), fc.stats_spec(bq, ids)]
  if cfg.count_visits:
    out_shape.append(jax.ShapeDtypeStruct((B, Hq, cfg.tq_pad, 2), jnp.int32))
    out_specs.append(fc.stats_spec(bq, ids, 2))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, block_axis=axis),
      grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=fc.compiler_params(cfg), interpret=cfg.interpret,
      name="jaxlm_flash_fwd",
  )(*args)
