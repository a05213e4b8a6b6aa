"""Pallas flash attention (jaxlm.kernels) against the XLA reference, in interpret mode.

Each case compiles the kernels once (forward + both backward kernels in one jit) and
compares the output and dq/dk/dv with `dot_product_attention` under the equivalent
boolean mask and ALiBi bias. The matrix is chosen, not a cartesian product: every
length (1, 100, 257, 512, with Tq != Tk), causal / non-causal, windows 1/16/64, GQA
1/2/4 and MQA, ALiBi, three packed segments, head dims 64/128, bf16/f32 and the TPU
(heads-major) layout appear at least once.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.kernels import flash_attention
from jaxlm.kernels.flash_attention import block_visits, flash_attention_with
from jaxlm.layers.attention import causal_mask, dot_product_attention, padding_mask, segment_mask
from jaxlm.layers.position import alibi_bias, alibi_slopes

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}

# name: (B, Tq, Tk, Hq, Hkv, D, causal, window, segments, alibi, dtype, block, heads_major)
CASES = {
    "causal_t100_gqa2": (1, 100, 100, 4, 2, 64, True, None, False, False, jnp.float32, 16, False),
    "decode_t1_mqa": (2, 1, 257, 4, 1, 64, True, None, False, False, jnp.float32, None, False),
    "cross_257x100_alibi_d128": (1, 257, 100, 4, 2, 128, False, None, False, True, jnp.float32,
                                 None, False),
    "window1_bf16": (1, 100, 100, 2, 2, 64, True, 1, False, False, jnp.bfloat16, None, False),
    "window16_100x257_gqa4": (1, 100, 257, 8, 2, 64, True, 16, False, False, jnp.float32, None,
                              False),
    "local16_noncausal_mqa": (1, 100, 100, 2, 1, 64, False, 16, False, False, jnp.float32, None,
                              False),
    "segments3_alibi": (2, 257, 257, 4, 2, 64, True, None, True, True, jnp.float32, None, False),
    "segments_window64_tpu_layout": (1, 100, 257, 4, 2, 64, True, 64, True, False, jnp.float32,
                                     None, True),
    "prefill_257x512_bf16_d128": (1, 257, 512, 4, 2, 128, True, None, False, True, jnp.bfloat16,
                                  128, False),
    "tq512_gt_tk257_window64_bf16": (1, 512, 257, 4, 1, 64, True, 64, False, False, jnp.bfloat16,
                                     128, False),
}
# Cases with query rows that see no key (segment padding; queries before the first key).
EMPTY_ROW_CASES = {"segments3_alibi", "segments_window64_tpu_layout",
                   "tq512_gt_tk257_window64_bf16"}


def _segments(B, T, key):
  """Three packed documents per row plus trailing padding (id 0), lengths vary per row."""
  ids = np.zeros((B, T), np.int32)
  rng = np.random.default_rng(key)
  for b in range(B):
    cuts = np.sort(rng.choice(np.arange(1, int(T * 0.9)), 2, replace=False))
    end = int(T * 0.9) + b
    ids[b, :cuts[0]], ids[b, cuts[0]:cuts[1]], ids[b, cuts[1]:end] = 1, 2, 3
  return jnp.asarray(ids)


def _reference_mask(B, Tq, Tk, causal, window, q_seg, kv_seg):
  """Boolean [B, 1, Tq, Tk] built from jaxlm's own mask helpers."""
  if causal:
    mask = causal_mask(Tq, Tk, window=window)
  else:
    i = jnp.arange(Tq)[:, None] + (Tk - Tq)
    j = jnp.arange(Tk)[None, :]
    mask = (jnp.abs(i - j) < window if window is not None else jnp.ones((Tq, Tk), bool))[None, None]
  mask = jnp.broadcast_to(mask, (B, 1, Tq, Tk))
  if q_seg is not None:
    mask = mask & segment_mask(q_seg, kv_seg) & padding_mask(kv_seg > 0)
  return mask


def _inputs(case):
  B, Tq, Tk, Hq, Hkv, D, causal, window, segs, alibi, dtype, _, _ = case
  kq, kk, kv, kw = jax.random.split(jax.random.key(Tq * 7 + Tk + Hq), 4)
  q = jax.random.normal(kq, (B, Tq, Hq, D), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (B, Tk, Hkv, D), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (B, Tk, Hkv, D), jnp.float32).astype(dtype)
  q_seg = kv_seg = None
  if segs:
    kv_seg = _segments(B, Tk, Tk)
    q_seg = kv_seg[:, Tk - Tq:]  # queries are the last Tq positions (end-aligned)
  mask = _reference_mask(B, Tq, Tk, causal, window, q_seg, kv_seg)
  has_key_BT = jnp.any(mask[:, 0], axis=-1)
  # Cotangent zero on rows with no visible key: the reference averages V there, we output 0.
  w = jax.random.normal(kw, (B, Tq, Hq, D), jnp.float32) * has_key_BT[:, :, None, None]
  return q, k, v, q_seg, kv_seg, mask, has_key_BT, w.astype(dtype)


def _ours(case, q_seg, kv_seg):
  B, Tq, Tk, Hq, Hkv, D, causal, window, segs, alibi, dtype, block, heads_major = case
  kwargs = dict(causal=causal, sliding_window=window, block_q=block, block_k=block,
                segment_ids=None if q_seg is None else (q_seg, kv_seg),
                alibi_slopes=alibi_slopes(Hq) if alibi else None)
  if not heads_major:
    return functools.partial(flash_attention, **kwargs)
  # The TPU layout, run in interpret mode: same kernels, heads-major BlockSpecs.
  return functools.partial(flash_attention_with, backend="interpret", heads_major=True, **kwargs)


def _reference(case, mask):
  Hq, Tk, alibi = case[3], case[2], case[9]
  bias = alibi_bias(jnp.arange(Tk)[None], Hq) if alibi else None
  return lambda q, k, v: dot_product_attention(q, k, v, mask, bias=bias)


def _out_and_grads(fn, q, k, v, w):
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(w)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
  case = CASES[name]
  dtype = case[10]
  q, k, v, q_seg, kv_seg, mask, has_key_BT, w = _inputs(case)
  out, grads = jax.jit(functools.partial(_out_and_grads, _ours(case, q_seg, kv_seg)))(q, k, v, w)
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731 (reference math in f32 on the same inputs)
  ref_out, ref_grads = jax.jit(functools.partial(_out_and_grads, _reference(case, mask)))(
      f32(q), f32(k), f32(v), f32(w))
  assert out.dtype == dtype and out.shape == q.shape
  assert all(g.dtype == dtype for g in grads)
  rows = np.asarray(has_key_BT)[:, :, None, None]
  # Error relative to max(1, max |reference|): absolute for O(1) values, relative for the
  # larger dk/dv sums (a bf16 gradient near 4 is only representable to +-1.6e-2).
  pairs = {"out": (np.where(rows, f32(out), 0.0), np.where(rows, ref_out, 0.0))}
  pairs.update({n: (f32(g), r) for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
  errs = {n: float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))
          for n, (a, b) in pairs.items()}
  print(f"{name:34s} " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()))  # pytest -s
  assert all(e <= TOL[dtype] for e in errs.values()), errs
  # Rows with no visible key are exactly zero (not NaN, not a uniform average of V).
  assert np.all(np.where(rows, 0.0, np.asarray(f32(out))) == 0.0)
  assert (~rows).any() == (name in EMPTY_ROW_CASES)


def test_logit_soft_cap_matches_reference():
  """cap * tanh(s / cap) inside the kernel, forward and backward (Gemma 2), with GQA, a
  window and ALiBi added after the cap; large logits so that the cap bites."""
  B, T, Hq, Hkv, D, cap = 1, 48, 4, 2, 32, 3.0
  kq, kk, kv, kw = jax.random.split(jax.random.key(1), 4)
  q = 4.0 * jax.random.normal(kq, (B, T, Hq, D))
  k, v = (jax.random.normal(x, (B, T, Hkv, D)) for x in (kk, kv))
  w = jax.random.normal(kw, (B, T, Hq, D))
  ours = functools.partial(flash_attention, causal=True, sliding_window=16,
                           alibi_slopes=alibi_slopes(Hq), logits_soft_cap=cap, block_q=16,
                           block_k=16)
  got = jax.jit(functools.partial(_out_and_grads, ours))(q, k, v, w)
  bias = alibi_bias(jnp.arange(T)[None], Hq)
  for c in (cap, None):  # the reference without its cap must not match
    ref = functools.partial(dot_product_attention, mask=causal_mask(T, T, window=16),
                            bias=bias, softcap=c)
    want = jax.jit(functools.partial(_out_and_grads, ref))(q, k, v, w)
    errs = [float(jnp.max(jnp.abs(a - b)) / max(1.0, float(jnp.max(jnp.abs(b)))))
            for a, b in zip((got[0], *got[1]), (want[0], *want[1]))]
    assert max(errs) <= TOL[jnp.float32] if c else min(errs) > 0.1, errs


def _expected_visits(cfg, Tq, Tk, G):
  """Brute force over positions: per program, (#blocks with a visible pair, #masked)."""
  off = Tk - Tq
  qi = np.arange(cfg.tq_pad)[:, None] + off
  kj = np.arange(cfg.tk_pad)[None, :]
  vis = np.ones((cfg.tq_pad, cfg.tk_pad), bool)
  if cfg.causal:
    vis &= qi >= kj
  if cfg.window is not None:
    vis &= qi - kj < cfg.window
    if not cfg.causal:
      vis &= kj - qi < cfg.window
  real_q = (np.arange(cfg.tq_pad) < Tq)[:, None]
  real_k = (np.arange(cfg.tk_pad) < Tk)[None, :]

  def tiles(x, bq, bk, reduce):
    return reduce(reduce(x.reshape(cfg.tq_pad // bq, bq, cfg.tk_pad // bk, bk), 3), 1)

  def counts(bq, bk, padded_rows_count):
    any_ = tiles(vis & real_q & real_k, bq, bk, np.any)
    # Full (unmasked) blocks: every pair visible and no padded key; the dK/dV kernel also
    # demands it of padded query rows, the forward and dQ kernels only of real rows.
    ok = vis & real_k if padded_rows_count else (vis & real_k) | ~real_q
    full = tiles(ok, bq, bk, np.all) & any_ & (not cfg.has_segments)
    return any_, full

  fa, ff = counts(cfg.block_q, cfg.block_k, False)
  qa, qf = counts(cfg.block_q_dq, cfg.block_k_dq, False)
  ka, kf = counts(cfg.block_q_dkv, cfg.block_k_dkv, True)
  return {"fwd": np.stack([fa.sum(1), (fa & ~ff).sum(1)], -1),
          "dq": np.stack([qa.sum(1), (qa & ~qf).sum(1)], -1),
          "dkv": G * np.stack([ka.sum(0), (ka & ~kf).sum(0)], -1)}


@pytest.mark.parametrize("Tq,Tk,causal,window,segs,block", [
    (100, 257, True, 64, False, (16, 32)),  # chunked prefill with a window; unequal blocks
    (257, 100, True, None, True, (32, 16)),  # more queries than keys: leading rows see nothing
    (100, 100, False, 16, False, (16, 16)),  # symmetric local window: a band of blocks
])
def test_masked_blocks_are_skipped(Tq, Tk, causal, window, segs, block):
  """Kernels count the key (or query) blocks they load and multiply; that must be exactly
  the blocks holding at least one visible (query, key) pair, and only blocks crossing a
  mask boundary may pay for the mask."""
  Hq, Hkv, D = 4, 2, 16
  q = jnp.ones((1, Tq, Hq, D))
  k = jnp.ones((1, Tk, Hkv, D))
  seg = (jnp.ones((1, Tq), jnp.int32), jnp.ones((1, Tk), jnp.int32)) if segs else None
  got = block_visits(q, k, k, causal=causal, sliding_window=window, segment_ids=seg,
                     block_q=block[0], block_k=block[1])
  want = _expected_visits(got["cfg"], Tq, Tk, Hq // Hkv)
  total = (got["cfg"].tq_pad // block[0]) * (got["cfg"].tk_pad // block[1])
  for name in ("fwd", "dq", "dkv"):
    np.testing.assert_array_equal(np.asarray(got[name][0, 0]), want[name], err_msg=name)
  assert got["fwd"][0, 0, :, 0].sum() < total // 2  # far fewer than all blocks ran


def test_bad_arguments_raise():
  q = jnp.zeros((1, 8, 6, 16))
  with pytest.raises(ValueError,
                     match=r"query heads 6 not a multiple of KV heads 4.*\(1, 8, 4, 16\)"):
    flash_attention(q, jnp.zeros((1, 8, 4, 16)), jnp.zeros((1, 8, 4, 16)))
  with pytest.raises(ValueError, match="head dim"):
    flash_attention(q, jnp.zeros((1, 8, 3, 8)), jnp.zeros((1, 8, 3, 8)))
  with pytest.raises(ValueError, match="equal shapes"):
    flash_attention(q, jnp.zeros((1, 8, 3, 16)), jnp.zeros((1, 9, 3, 16)))
  with pytest.raises(ValueError, match="Tq == Tk"):
    flash_attention(q, jnp.zeros((1, 9, 3, 16)), jnp.zeros((1, 9, 3, 16)),
                    segment_ids=jnp.ones((1, 8), jnp.int32))
  with pytest.raises(ValueError, match="alibi_slopes"):
    flash_attention(q, q, q, alibi_slopes=jnp.ones(3))
  with pytest.raises(ValueError, match="power of two"):
    flash_attention(q, q, q, block_q=24)
  with pytest.raises(ValueError, match="logits_soft_cap"):
    flash_attention(q, q, q, logits_soft_cap=0.0)


@pytest.mark.parametrize("platform,D,dtype", [("cuda", 64, jnp.bfloat16), ("cuda", 80, jnp.float32),
                                              ("tpu", 64, jnp.bfloat16), ("tpu", 128, jnp.float32)])
def test_lowers_for_accelerators(platform, D, dtype):
  """Lowers forward + backward for GPU (Triton IR) and TPU (Mosaic) from this CPU host.

  Only the Pallas lowering runs; Triton / Mosaic compilation needs the real device.
  (D = 80 exercises the GPU path's padding of the head dim to a power of two.)"""
  patched = False
  if platform == "tpu":
    try:  # Mosaic asks the default device for its TPU generation: pretend a v5e.
      from jax._src.pallas.mosaic import tpu_info
      if "cpu" not in tpu_info.registry:
        tpu_info.registry["cpu"] = lambda: tpu_info.get_tpu_info_for_chip(
            tpu_info.ChipVersion.TPU_V5E, 1)
        patched = True
    except (ImportError, AttributeError) as e:
      pytest.skip(f"no Mosaic TPU lowering here: {e}")
  try:
    _export_and_count(platform, D, dtype)
  finally:
    if patched:
      del tpu_info.registry["cpu"]


def _export_and_count(platform, D, dtype):
  backend = "gpu" if platform == "cuda" else "tpu"

  def loss(q, k, v, seg, slopes):
    out = flash_attention_with(q, k, v, causal=True, sliding_window=64, segment_ids=seg,
                               alibi_slopes=slopes, logits_soft_cap=30.0, backend=backend)
    return jnp.sum(out.astype(jnp.float32))

  sds = jax.ShapeDtypeStruct
  args = (sds((2, 300, 8, D), dtype), sds((2, 300, 2, D), dtype), sds((2, 300, 2, D), dtype),
          sds((2, 300), jnp.int32), sds((8,), jnp.float32))
  target = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
  exported = jax.export.export(
      jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=[platform],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)])(*args)
  calls = re.findall(r"custom_call @(\S+)\(", exported.mlir_module())
  assert calls.count(target) == 3, calls  # forward, dQ and dK/dV kernels
