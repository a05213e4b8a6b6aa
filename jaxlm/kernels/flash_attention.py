"""Flash attention in Pallas: forward and backward kernels behind one `jax.custom_vjp`.

    out_BTNH = flash_attention(q_BTNH, k_BSKH, v_BSKH, causal=True, sliding_window=4096,
                               segment_ids=segment_ids_BT, alibi_slopes=slopes_N)

Matches `jaxlm.layers.attention.dot_product_attention` with the equivalent mask / bias:
  * causal: query i attends key j iff i + (Tk - Tq) >= j (queries end-aligned, as
    `causal_mask`); with `sliding_window` w additionally i + (Tk - Tq) - j < w. Without
    `causal`, a window is symmetric: |i + (Tk - Tq) - j| < w.
  * segment_ids: int [B, T] (self-attention, Tq == Tk) or (q_ids [B, Tq], kv_ids [B, Tk]).
    A query attends a key iff their ids are equal AND the key's id is non-zero, exactly
    jaxlm's decoder mask (`segment_mask & padding_mask(segment_ids > 0)`): 0 marks
    padding. Queries with id 0 therefore see nothing.
  * Rows that see no key at all (padding queries, queries before the first key of a
    window, ...) output exactly 0 and pass no gradient; the XLA reference would instead
    average V uniformly over a fully masked row.
  * alibi_slopes [Hq]: adds slope_h * (j - i') with i' = i + (Tk - Tq), computed from
    positions in the kernel. This equals jaxlm's `alibi_bias(position_ids)` (slope * j)
    up to a per-row constant, i.e. the same softmax, whenever positions are contiguous.
  * logits_soft_cap c: the scaled logits become c * tanh(logits / c) (Gemma 2), before
    the ALiBi bias and the mask, in the forward and (through 1 - tanh^2) the backward.
  * GQA / MQA: Hq % Hkv == 0; query head h reads KV head h // (Hq // Hkv), never a copy.
  * Any lengths: inputs are zero-padded to the block sizes here and the padding masked.
  * bf16 or f32 inputs; logits, softmax statistics and accumulators are f32. The output
    has q's dtype; gradients flow to q, k and v only.

Block skipping is positional: blocks wholly above the causal diagonal or outside the
window are never loaded or multiplied (in the backward too); segment ids only mask, they
do not skip (a packed row's cross-document blocks still run).

Backends: GPU lowers through Pallas' Triton backend, TPU through Mosaic (heads-major
layout, all grid axes parallel); on CPU the kernels run in Pallas interpret mode, which
`interpret=None` selects automatically. Block sizes default per backend. Both lowerings
are checked from CPU (tests/test_flash_attention.py) but neither has been compiled on a
device here. On TPU each program keeps whole-sequence K/V (forward, dQ) or the group's
Q/dO (dK/dV) in VMEM, which bounds the sequence length to a few thousand tokens at
D = 128 before the VMEM limit; longer TPU sequences need a key-block grid axis with
scratch accumulators (not implemented). On GPU those blocks are only pointers.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

from jaxlm.kernels import flash_common as fc
from jaxlm.kernels.flash_bwd import flash_dkv, flash_dq
from jaxlm.kernels.flash_common import FlashConfig
from jaxlm.kernels.flash_fwd import flash_forward

# (fwd block_q, block_k), (dq block_q, block_k), (dkv block_q, block_k), num_warps, stages.
# GPU numbers follow the usual Triton flash-attention choices for Hopper/Ampere (untuned
# here); TPU blocks are large because each grid step has a fixed ~0.35us overhead; the
# interpret blocks are small so short test sequences still span several blocks.
_DEFAULT_BLOCKS = {
    "gpu": {64: ((128, 64), (64, 64), (64, 64), 4, 3),
            128: ((128, 64), (64, 64), (64, 64), 8, 2)},
    "tpu": {0: ((256, 512), (256, 256), (256, 256), None, None)},
    "interpret": {0: ((32, 32), (32, 32), (32, 32), None, None)},
}
_MIN_BLOCK = {"gpu": 16, "tpu": 8, "interpret": 8}  # tl.dot needs >= 16; TPU sublanes: 8


def _platform_backend(interpret: bool | None) -> str:
  platform = jax.default_backend()
  if interpret is None:
    interpret = platform not in ("gpu", "cuda", "rocm", "tpu")
  if interpret:
    return "interpret"
  return "tpu" if platform == "tpu" else "gpu"


def _pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _check(q, k, v, segment_ids, alibi_slopes, sliding_window, block_q, block_k,
           logits_soft_cap=None):
  def fail(msg):
    raise ValueError(f"flash_attention: {msg} (q {tuple(q.shape)}, k {tuple(k.shape)}, "
                     f"v {tuple(v.shape)})")

  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    fail("expected q [B, Tq, Hq, D] and k, v [B, Tk, Hkv, D] of equal shapes")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    fail("batch and head dim of q and k/v must match")
  if q.shape[2] % k.shape[2]:
    fail(f"query heads {q.shape[2]} not a multiple of KV heads {k.shape[2]}")
  if min(q.shape) < 1 or min(k.shape) < 1:
    fail("empty dimension")
  if not (q.dtype == k.dtype == v.dtype) or not jnp.issubdtype(q.dtype, jnp.floating):
    fail(f"q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  B, Tq, Hq, _ = q.shape
  Tk = k.shape[1]
  if segment_ids is not None:
    if isinstance(segment_ids, (tuple, list)):
      q_seg, kv_seg = segment_ids
    elif Tq != Tk:
      fail("a single segment_ids array needs Tq == Tk; pass (q_ids, kv_ids)")
    else:
      q_seg = kv_seg = segment_ids
    if tuple(q_seg.shape) != (B, Tq) or tuple(kv_seg.shape) != (B, Tk):
      fail(f"segment ids {tuple(q_seg.shape)}, {tuple(kv_seg.shape)} must be [B, Tq], "
           "[B, Tk]")
  if alibi_slopes is not None and tuple(jnp.shape(alibi_slopes)) != (Hq,):
    fail(f"alibi_slopes {tuple(jnp.shape(alibi_slopes))} must be [Hq] = ({Hq},)")
  if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(
      sliding_window, numbers.Integral) or sliding_window < 1):
    fail(f"sliding_window must be a positive int, got {sliding_window!r}")
  if logits_soft_cap is not None and not (isinstance(logits_soft_cap, numbers.Real)
                                          and logits_soft_cap > 0):
    fail(f"logits_soft_cap must be a positive number, got {logits_soft_cap!r}")
  for name, blk in (("block_q", block_q), ("block_k", block_k)):
    if blk is not None and (not isinstance(blk, numbers.Integral) or blk < 1 or blk & (blk - 1)):
      fail(f"{name} must be a power of two, got {blk!r}")


def prepare(q_BTNH, k_BSKH, v_BSKH, *, causal=False, sliding_window=None, segment_ids=None,
            alibi_slopes=None, sm_scale=None, logits_soft_cap=None, block_q=None, block_k=None,
            interpret=None, backend=None, heads_major=None, count_visits=False):
  """Validates, picks blocks, pads and lays out the inputs: returns (cfg, kernel args).

  `backend` / `heads_major` override the platform's choice (tests: TPU layout in
  interpret mode; lowering for another platform than the one running).
  """
  _check(q_BTNH, k_BSKH, v_BSKH, segment_ids, alibi_slopes, sliding_window, block_q, block_k,
         logits_soft_cap)
  B, Tq, Hq, D = q_BTNH.shape
  Tk, Hkv = k_BSKH.shape[1], k_BSKH.shape[2]
  backend = backend or _platform_backend(interpret)
  table = _DEFAULT_BLOCKS[backend]
  fwd, dq, dkv, warps, stages = table[64 if D <= 64 else 128] if backend == "gpu" else table[0]
  lo = _MIN_BLOCK[backend]
  # No 128-row blocks for Tq = 1, and never below the backend's minimum tile.
  fit_q = lambda b: int(max(lo, min(block_q or b, _pow2(Tq))))  # noqa: E731
  fit_k = lambda b: int(max(lo, min(block_k or b, _pow2(Tk))))  # noqa: E731
  blocks = [fit_q(fwd[0]), fit_k(fwd[1]), fit_q(dq[0]), fit_k(dq[1]), fit_q(dkv[0]),
            fit_k(dkv[1])]
  tq_pad = _round_up(Tq, max(blocks[0::2]))  # powers of two: the largest is a multiple
  tk_pad = _round_up(Tk, max(blocks[1::2]))
  # Triton tiles must have power-of-two sizes: zero columns change neither q.k nor the
  # (sliced-off) extra output columns.
  d_pad = _pow2(max(D, 16)) if backend == "gpu" else D
  if heads_major is None:
    heads_major = backend == "tpu"
  cfg = FlashConfig(
      tq=Tq, tk=Tk, tq_pad=tq_pad, tk_pad=tk_pad, num_q_heads=Hq, num_kv_heads=Hkv,
      head_dim=d_pad, sm_scale=float(D ** -0.5 if sm_scale is None else sm_scale),
      causal=bool(causal), window=None if sliding_window is None else int(sliding_window),
      has_segments=segment_ids is not None, has_alibi=alibi_slopes is not None,
      softcap=None if logits_soft_cap is None else float(logits_soft_cap),
      block_q=blocks[0], block_k=blocks[1], block_q_dq=blocks[2], block_k_dq=blocks[3],
      block_q_dkv=blocks[4], block_k_dkv=blocks[5],
      backend=backend, heads_major=heads_major, num_warps=warps, num_stages=stages,
      count_visits=count_visits)

  def layout(x, t_pad):
    x = jnp.pad(x, ((0, 0), (0, t_pad - x.shape[1]), (0, 0), (0, d_pad - D)))
    return x.transpose(0, 2, 1, 3) if heads_major else x

  q_seg = kv_seg = slopes = None
  if segment_ids is not None:
    q_ids, kv_ids = (segment_ids if isinstance(segment_ids, (tuple, list))
                     else (segment_ids, segment_ids))
    # Padded positions get id 0: padded keys are then masked like any padding key.
    q_seg = jnp.pad(q_ids.astype(jnp.int32), ((0, 0), (0, tq_pad - Tq)))[:, :, None]
    kv_seg = jnp.pad(kv_ids.astype(jnp.int32), ((0, 0), (0, tk_pad - Tk)))[:, None, :]
  if alibi_slopes is not None:
    slopes = jax.lax.stop_gradient(jnp.asarray(alibi_slopes, jnp.float32) * fc.LOG2E)
    slopes = slopes.reshape(Hq, 1, 1)
  args = (layout(q_BTNH, tq_pad), layout(k_BSKH, tk_pad), layout(v_BSKH, tk_pad), q_seg,
          kv_seg, slopes)
  return cfg, args


def _unlayout(o, cfg: FlashConfig, D: int):
  o = o.transpose(0, 2, 1, 3) if cfg.heads_major else o
  return o[:, :cfg.tq, :, :D]


def _row_sums(o, do, cfg: FlashConfig):
  """delta = rowsum(dO * O) in f32, as [B, Hq, Tq_pad, 1] row statistics."""
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  return fc.to_stats(delta if cfg.heads_major else delta.transpose(0, 2, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attend(q, k, v, q_seg, kv_seg, slopes, cfg):
  return flash_forward(q, k, v, q_seg, kv_seg, slopes, cfg)[0]


def _attend_fwd(q, k, v, q_seg, kv_seg, slopes, cfg):
  o, lse = flash_forward(q, k, v, q_seg, kv_seg, slopes, cfg)[:2]
  return o, (q, k, v, q_seg, kv_seg, slopes, o, lse)


def _attend_bwd(cfg, res, do):
  q, k, v, q_seg, kv_seg, slopes, o, lse = res
  delta = _row_sums(o, do, cfg)
  dq = flash_dq(q, k, v, q_seg, kv_seg, slopes, do, lse, delta, cfg)[0]
  dk, dv = flash_dkv(q, k, v, q_seg, kv_seg, slopes, do, lse, delta, cfg)[:2]
  return dq, dk, dv, None, None, None  # segment ids and slopes: not differentiable


_attend.defvjp(_attend_fwd, _attend_bwd)


def flash_attention(q, k, v, *, causal: bool = False, sliding_window: int | None = None,
                    segment_ids=None, alibi_slopes=None, sm_scale: float | None = None,
                    logits_soft_cap: float | None = None, block_q: int | None = None,
                    block_k: int | None = None, interpret: bool | None = None):
  """Memory-efficient exact attention: q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D] -> [B, Tq, Hq, D].

  See the module docstring for the masking, segment, ALiBi, soft-cap and padding
  conventions. `sm_scale` defaults to 1/sqrt(D). `block_q` / `block_k` (powers of two) override the
  per-backend block sizes of all three kernels. `interpret=None` runs the kernels in
  Pallas interpret mode on CPU and compiles them on GPU / TPU.
  """
  return flash_attention_with(q, k, v, causal=causal, sliding_window=sliding_window,
                              segment_ids=segment_ids, alibi_slopes=alibi_slopes,
                              sm_scale=sm_scale, logits_soft_cap=logits_soft_cap,
                              block_q=block_q, block_k=block_k, interpret=interpret)


def flash_attention_with(q, k, v, *, backend: str | None = None,
                         heads_major: bool | None = None, **kwargs):
  """`flash_attention` with the backend ("gpu" | "tpu" | "interpret") and the layout
  forced: e.g. the TPU (heads-major) layout in interpret mode, or lowering for an
  accelerator from a CPU host (jax.export)."""
  cfg, args = prepare(q, k, v, backend=backend, heads_major=heads_major, **kwargs)
  return _unlayout(_attend(*args, cfg), cfg, q.shape[-1])


def block_visits(q, k, v, **kwargs):
  """Debug: runs the three kernels with visit counting on; returns a dict of int arrays
  {"fwd": [B, Hq, nq, 2], "dq": [B, Hq, nq, 2], "dkv": [B, Hkv, nk, 2]}: per program,
  (key or query blocks whose tiles were loaded and multiplied, how many of those applied
  the mask). The dK/dV count sums over the `group` query heads of each KV head."""
  cfg, args = prepare(q, k, v, count_visits=True, **kwargs)
  o, lse, fwd = flash_forward(*args, cfg)
  do = jnp.ones_like(o)
  delta = _row_sums(o, do, cfg)
  dq = flash_dq(*args, do, lse, delta, cfg)[1]
  dkv = flash_dkv(*args, do, lse, delta, cfg)[2]
  per_block = lambda c, b: c[:, :, ::b, :]  # noqa: E731 (the tile repeats one count)
  return {"fwd": per_block(fwd, cfg.block_q), "dq": per_block(dq, cfg.block_q_dq),
          "dkv": per_block(dkv, cfg.block_k_dkv), "cfg": cfg}


__all__ = ["flash_attention", "flash_attention_with", "block_visits", "prepare"]
