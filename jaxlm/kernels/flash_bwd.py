"""Flash-attention backward kernels: probabilities are recomputed from the saved lse.

  dQ kernel:    one program per (batch, query head, query block), walking key blocks.
  dK/dV kernel: one program per (batch, KV head, key block), walking the query blocks of
                all `group` query heads that share the KV head, so grouped-query
                gradients are summed in the f32 accumulator instead of materialized per
                query head and reduced afterwards.

With P = exp2(s - lse), dP = dO V^T and delta = rowsum(dO * O):
  dS = P * (dP - delta),  dQ = scale * dS K,  dK = scale * dS^T Q,  dV = P^T dO,
where a soft cap (cap * tanh(x / cap) on the logits) multiplies dS by 1 - tanh^2 first.
Both kernels skip invisible blocks with the same block ranges as the forward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxlm.kernels import flash_common as fc
from jaxlm.kernels.flash_common import FlashConfig


def _ds_tile(q, k, v, do, lse, delta, q_pos, k_pos, q_seg, k_seg, slope, masked, cfg):
  """Recomputed P and dS [bq, bk] (f32) for one (query block, key block) pair."""
  s, dcap = fc.logits(q, k, q_pos, k_pos, slope, cfg)
  if masked:
    s = jnp.where(fc.visible(q_pos, k_pos, q_seg, k_seg, cfg), s, fc.NEG_INF)
  p = jnp.exp2(s - lse)  # lse = +inf on empty / padded rows -> p = 0
  dp = fc.dot_nt(do, v, cfg)
  ds = p * (dp - delta)
  return p, ds if dcap is None else ds * dcap


# ---- dQ -------------------------------------------------------------------------------
def _dq_kernel(*refs, cfg: FlashConfig, block_axis: int):
  refs = list(refs)
  q_ref, k_ref, v_ref = refs.pop(0), refs.pop(0), refs.pop(0)
  qseg_ref, kseg_ref = (refs.pop(0), refs.pop(0)) if cfg.has_segments else (None, None)
  slope_ref = refs.pop(0) if cfg.has_alibi else None
  do_ref, lse_ref, delta_ref = refs.pop(0), refs.pop(0), refs.pop(0)
  dq_ref = refs.pop(0)
  cnt_ref = refs.pop(0) if cfg.count_visits else None
  bq, bk = cfg.block_q_dq, cfg.block_k_dq

  qi = pl.program_id(block_axis)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_pos = fc.positions(qi * bq + cfg.offset, bq, 0)
  q_seg = qseg_ref[...] if qseg_ref is not None else None
  slope = slope_ref[...] if slope_ref is not None else None

  def step(kb, carry, masked):
    dq, visits, n_masked = carry
    start = pl.multiple_of(kb * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    k_seg = kseg_ref[:, pl.ds(start, bk)] if (masked and kseg_ref is not None) else None
    _, ds = _ds_tile(q, k, v, do, lse, delta, q_pos, fc.positions(start, bk, 1), q_seg, k_seg,
                     slope, masked, cfg)
    dq = dq + fc.dot_nn(ds.astype(k.dtype), k, cfg)
    return dq, visits + 1, n_masked + int(masked)

  lo, a, b, hi = fc.kv_block_range(qi, cfg, bq, bk)
  dq, visits, n_masked = fc.run_blocks(
      lo, a, b, hi, step, (jnp.zeros((bq, cfg.head_dim), jnp.float32), jnp.int32(0), jnp.int32(0)))
  dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)
  if cnt_ref is not None:
    cnt_ref[...] = fc.counts_tile(bq, visits, n_masked)


def flash_dq(q, k, v, q_seg, kv_seg, slopes, do, lse, delta, cfg: FlashConfig):
  B, Hq = q.shape[0], cfg.num_q_heads
  bq = cfg.block_q_dq
  grid, ids, axis = fc.grid_bhn(cfg, B, Hq, cfg.tq_pad // bq)
  in_specs, args = fc.query_block_inputs(cfg, bq, ids, q, k, v, q_seg, kv_seg, slopes)
  in_specs += [fc.seq_spec(cfg, bq, ids), fc.stats_spec(bq, ids), fc.stats_spec(bq, ids)]
  args += [do, lse, delta]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  out_specs = [fc.seq_spec(cfg, bq, ids)]
  if cfg.count_visits:
    out_shape.append(jax.ShapeDtypeStruct((B, Hq, cfg.tq_pad, 2), jnp.int32))
    out_specs.append(fc.stats_spec(bq, ids, 2))
  return pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, block_axis=axis),
      grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=fc.compiler_params(cfg), interpret=cfg.interpret,
      name="jaxlm_flash_dq",
  )(*args)


# ---- dK / dV --------------------------------------------------------------------------
def _dkv_kernel(*refs, cfg: FlashConfig, block_axis: int):
  refs = list(refs)
  k_ref, v_ref, q_ref = refs.pop(0), refs.pop(0), refs.pop(0)
  qseg_ref, kseg_ref = (refs.pop(0), refs.pop(0)) if cfg.has_segments else (None, None)
  slope_ref = refs.pop(0) if cfg.has_alibi else None
  do_ref, lse_ref, delta_ref = refs.pop(0), refs.pop(0), refs.pop(0)
  dk_ref, dv_ref = refs.pop(0), refs.pop(0)
  cnt_ref = refs.pop(0) if cfg.count_visits else None
  bq, bk, G = cfg.block_q_dkv, cfg.block_k_dkv, cfg.group

  kb = pl.program_id(block_axis)
  k, v = k_ref[...], v_ref[...]
  k_pos = fc.positions(kb * bk, bk, 1)
  k_seg = kseg_ref[...] if kseg_ref is not None else None

  def run_range(first, end, masked, carry):
    # One loop over (query head g of the group) x (query block in [first, end)).
    n = end - first

    def step(t, carry):
      dk, dv, visits, n_masked = carry
      g, qb = (0, first + t) if G == 1 else (lax.div(t, n), first + lax.rem(t, n))
      start = pl.multiple_of(qb * bq, bq)
      q = fc.grouped_rows(q_ref, cfg, g, start, bq)
      do = fc.grouped_rows(do_ref, cfg, g, start, bq)
      lse = lse_ref[g, pl.ds(start, bq), :]
      delta = delta_ref[g, pl.ds(start, bq), :]
      q_seg = qseg_ref[pl.ds(start, bq), :] if (masked and qseg_ref is not None) else None
      slope = slope_ref[g] if slope_ref is not None else None
      p, ds = _ds_tile(q, k, v, do, lse, delta, fc.positions(start + cfg.offset, bq, 0), k_pos,
                       q_seg, k_seg, slope, masked, cfg)
      dv = dv + fc.dot_tn(p.astype(do.dtype), do, cfg)
      dk = dk + fc.dot_tn(ds.astype(q.dtype), q, cfg)
      return dk, dv, visits + 1, n_masked + int(masked)

    return lax.fori_loop(0, G * n, step, carry)

  zeros = jnp.zeros((bk, cfg.head_dim), jnp.float32)
  carry = (zeros, zeros, jnp.int32(0), jnp.int32(0))
  lo, a, b, hi = fc.q_block_range(kb, cfg, bq, bk)
  carry = run_range(lo, a, True, carry)
  carry = run_range(a, b, False, carry)
  dk, dv, visits, n_masked = run_range(b, hi, True, carry)
  dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  if cnt_ref is not None:
    cnt_ref[...] = fc.counts_tile(bk, visits, n_masked)


def flash_dkv(q, k, v, q_seg, kv_seg, slopes, do, lse, delta, cfg: FlashConfig):
  B, Hkv, G = q.shape[0], cfg.num_kv_heads, cfg.group
  bk = cfg.block_k_dkv
  grid, ids, axis = fc.grid_bhn(cfg, B, Hkv, cfg.tk_pad // bk)
  full_q = lambda *g: (*ids(*g)[:2], 0)  # noqa: E731
  in_specs = [fc.seq_spec(cfg, bk, ids), fc.seq_spec(cfg, bk, ids),
              fc.grouped_seq_spec(cfg, cfg.tq_pad, ids)]
  args = [k, v, fc.as_grouped_seq(q, cfg)]
  if cfg.has_segments:
    in_specs += [pl.BlockSpec((None, cfg.tq_pad, 1), lambda *g: (ids(*g)[0], 0, 0)),
                 pl.BlockSpec((None, 1, bk), lambda *g: (ids(*g)[0], 0, ids(*g)[2]))]
    args += [q_seg, kv_seg]
  if cfg.has_alibi:
    in_specs.append(pl.BlockSpec((None, G, 1, 1), lambda *g: (ids(*g)[1], 0, 0, 0)))
    args.append(slopes.reshape(Hkv, G, 1, 1))
  grouped_stats = pl.BlockSpec((None, None, G, cfg.tq_pad, 1),
                               lambda *g: (*full_q(*g)[:2], 0, 0, 0))
  in_specs += [fc.grouped_seq_spec(cfg, cfg.tq_pad, ids), grouped_stats, grouped_stats]
  args += [fc.as_grouped_seq(do, cfg), fc.as_grouped_stats(lse, cfg),
           fc.as_grouped_stats(delta, cfg)]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  out_specs = [fc.seq_spec(cfg, bk, ids), fc.seq_spec(cfg, bk, ids)]
  if cfg.count_visits:
    out_shape.append(jax.ShapeDtypeStruct((B, Hkv, cfg.tk_pad, 2), jnp.int32))
    out_specs.append(fc.stats_spec(bk, ids, 2))
  return pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, block_axis=axis),
      grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=fc.compiler_params(cfg), interpret=cfg.interpret,
      name="jaxlm_flash_dkv",
  )(*args)
