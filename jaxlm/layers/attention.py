"""Multi-head attention (MHA / MQA / GQA), the masks it consumes, and the backend switch.

K/V heads are never repeated: queries are grouped as [B, T, K, G, H] so each of the
K key/value heads serves G = num_heads // K query heads. A mask is either a `MaskSpec`
(causal / window / segment ids: what every backend understands, and what a flash kernel
needs to skip blocks) or a boolean array broadcastable to [B, 1, T, S] (True = attend).
Position information enters either by rotating q and k (RoPE) or as an additive logits
bias (ALiBi, relative-position buckets), which is added before masking.

`impl` (model.attention_impl) picks the backend: "xla" (the einsum/softmax reference
below), "pallas" (jaxlm.kernels.flash_attention), "cudnn"
(jax.nn.dot_product_attention(implementation="cudnn")) or "auto" (the best available).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.errors import ConfigError
from jaxlm.layers.activations import softcap as apply_softcap
from jaxlm.layers.dropout import dropout
from jaxlm.layers.kv_cache import KVCache, cached_mask
from jaxlm.layers.linear import Dense, einsum
from jaxlm.layers.position import ALiBi, RoPE, apply_rope
from jaxlm.parallel.rules import constrain


# ---- masks ---------------------------------------------------------------------------
def padding_mask(attention_mask_BS):
  """Keys that are real tokens (1) rather than padding (0): [B, 1, 1, S]."""
  return attention_mask_BS.astype(bool)[:, None, None, :]


def causal_mask(q_len: int, kv_len: int, *, window: int | None = None):
  """Query i attends key j iff 0 <= i - j (< window). Queries sit at the end of the keys."""
  i = jnp.arange(q_len)[:, None] + (kv_len - q_len)
  j = jnp.arange(kv_len)[None, :]
  allowed = i >= j
  if window is not None:
    allowed &= (i - j) < window
  return allowed[None, None]


def segment_mask(q_segment_ids_BT, kv_segment_ids_BS):
  """Packed sequences: attend only within the same segment (document)."""
  return (q_segment_ids_BT[:, None, :, None] == kv_segment_ids_BS[:, None, None, :])


@flax.struct.dataclass
class MaskSpec:
  """Who attends whom, structurally: query i sees key j iff (causal: 0 <= i' - j, with
  i' = i + S - T, and < window) and q_segment_ids[i] == kv_segment_ids[j] != 0.

  Padding is segment 0 on the key side; `None` segment ids mean "all one segment".
  """

  q_segment_ids: jax.Array | None = None  # [B, T]
  kv_segment_ids: jax.Array | None = None  # [B, S]
  causal: bool = flax.struct.field(pytree_node=False, default=False)
  window: int | None = flax.struct.field(pytree_node=False, default=None)

  @classmethod
  def build(cls, T: int, *, causal=False, window=None, attention_mask=None, segment_ids=None,
            kv_mask=None):
    """From the usual inputs: `attention_mask` [B, T] marks real tokens (self-attention),
    `segment_ids` [B, T] packed documents (0 = padding), `kv_mask` [B, S] the real keys
    of a cross-attention."""
    q, kv = segment_ids, segment_ids
    real = attention_mask if kv_mask is None else kv_mask
    if real is not None:
      kv = real.astype(jnp.int32) * (1 if kv is None else kv)
      q = jnp.ones((real.shape[0], T), jnp.int32) if q is None else q
    return cls(q, kv, causal=causal, window=window)

  def dense(self, T: int, S: int):
    """The boolean mask [B|1, 1, T, S] (None when nothing is masked)."""
    mask = causal_mask(T, S, window=self.window) if self.causal else None
    if self.kv_segment_ids is not None:
      seg = segment_mask(self.q_segment_ids, self.kv_segment_ids) & padding_mask(
          self.kv_segment_ids > 0)
      mask = seg if mask is None else mask & seg
    return mask


_HALF = (jnp.bfloat16, jnp.float16)  # what cuDNN's fused attention computes in


def resolve_impl(impl: str, *, dense_bias: bool = False, softcap: bool = False,
                 dtype=jnp.float32, platform: str | None = None) -> str:
  """The backend to run for compute dtype `dtype` on `platform` (default: JAX's).

  "auto" picks cuDNN on NVIDIA GPUs for bf16/fp16 models, our Pallas kernel on TPU and
  the XLA reference elsewhere (Pallas on CPU runs in the slow interpret mode). A float32
  model stays in float32 on a GPU too (the XLA reference): cuDNN's fused attention runs
  in bf16/fp16 only, and auto never lowers a model's precision. cuDNN has no logit
  soft-capping (`softcap`): auto then picks our Pallas kernel on the GPU. An explicit choice the
  platform or model cannot run is a one-line ConfigError. The GPU branches have run on
  one H200 (benchmarks/results/gpu_train-h200-20261204.json); the tests fake the platform.
  """
  platform = platform or jax.default_backend()
  half = jnp.dtype(dtype) in [jnp.dtype(d) for d in _HALF]
  if impl == "auto":
    if platform == "gpu":
      if half and softcap:
        return "pallas"
      return "cudnn" if half else "xla"
    return "pallas" if platform == "tpu" and not dense_bias else "xla"
  if impl == "cudnn" and platform != "gpu":
    raise ConfigError(f"model.attention_impl='cudnn' needs an NVIDIA GPU, but JAX runs on "
                      f"{platform}; use 'xla', 'pallas' or 'auto'")
  if impl == "cudnn" and softcap:
    raise ConfigError("model.attention_impl='cudnn' has no attention-logit soft-capping "
                      "(model.attn_logit_softcapping); use 'pallas', 'xla' or 'auto'")
  if impl == "cudnn" and not half:
    raise ConfigError(f"model.attention_impl='cudnn' runs attention in bf16/fp16, but the "
                      f"model computes in {jnp.dtype(dtype).name}; set model.dtype (or "
                      "train.precision) to bf16, or use 'xla', 'pallas' or 'auto'")
  if impl == "pallas" and dense_bias:
    raise ConfigError("model.attention_impl='pallas' does not support a learned dense "
                      "attention bias (T5 relative positions); use 'xla' or 'auto'")
  return impl


# ---- attention -------------------------------------------------------------------------
def dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask, *, bias=None, dropout_rate=0.0,
                          rngs=None, dtype=jnp.float32, scale: float | None = None,
                          softcap: float | None = None):
  """Softmax attention in float32 with grouped K/V heads; returns [B, T, N, H].

  `bias` (float, broadcastable to [B, N, T, S], e.g. ALiBi [1|B, N, 1, S]) is added to
  the scaled logits before the mask. `scale` defaults to 1/sqrt(H) (T5 uses 1: its
  initialization folds the scaling into the query weights). `softcap`: the scaled logits
  become cap * tanh(logits / cap) before the bias and the mask (Gemma 2).
  """
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  G = N // K
  q_BTKGH = q_BTNH.reshape(B, T, K, G, H) * (H ** -0.5 if scale is None else scale)
  # Logits [B, K, T, G, S]: the query's (t, g) order, so the matmul writes them in place
  # (a [B, K, G, T, S] layout cost a transposed copy of the largest tensor per layer;
  # docs/performance.md#matmul-layouts-on-cpu).
  logits_BKTGS = einsum("btkgh,bskh->bktgs", q_BTKGH, k_BSKH, dtype, b_grad_order="bkhs")
  logits_BKTGS = apply_softcap(logits_BKTGS, softcap)
  if bias is not None:
    # Query head n = k * G + g, matching the reshape of q above.
    b, n, t, s = bias.shape
    bias = bias.astype(jnp.float32)
    bias_bKtGS = (bias.reshape(b, K, G, t, s).transpose(0, 1, 3, 2, 4) if n == N
                  else bias[:, :, :, None])
    logits_BKTGS = logits_BKTGS + bias_bKtGS
  if mask is not None:
    mask_B1TS = mask if mask.ndim == 4 else mask[:, None]
    logits_BKTGS = jnp.where(mask_B1TS[:, :, :, None], logits_BKTGS,
                             jnp.finfo(jnp.float32).min)
  probs_BKTGS = jax.nn.softmax(logits_BKTGS, axis=-1)
  probs_BKTGS = dropout(probs_BKTGS, dropout_rate, rngs)
  out_BTKGH = einsum("bktgs,bskh->btkgh", probs_BKTGS, v_BSKH, dtype, b_grad_order="bkhs")
  return out_BTKGH.reshape(B, T, N, H)


def decode_attention(q_B1NH, k_BKSH, v_BKSH, mask, *, bias=None, dtype=jnp.float32,
                     scale: float | None = None, softcap: float | None = None):
  """`dot_product_attention` for one query per row against a KV cache stored [B, K, S, H]
  (layers/kv_cache.py): both products are then plain batched matmuls over (row, kv head),
  where the [B, S, K, H] layout cost a transposed copy of the cache per layer and step
  (docs/performance.md#decoding-on-cpu). Returns [B, 1, N, H]."""
  B, _, N, H = q_B1NH.shape
  K = k_BKSH.shape[1]
  G = N // K
  q_BKGH = q_B1NH.reshape(B, K, G, H) * (H ** -0.5 if scale is None else scale)
  logits_BKGS = apply_softcap(einsum("bkgh,bksh->bkgs", q_BKGH, k_BKSH, dtype), softcap)
  if bias is not None:  # [b, N or 1, 1, S]; query head n = k * G + g
    b, n, _, s = bias.shape
    logits_BKGS = logits_BKGS + bias.astype(jnp.float32).reshape(b, K if n > 1 else 1,
                                                                 G if n > 1 else 1, s)
  if mask is not None:
    mask_BS = (mask if mask.ndim == 4 else mask[:, None])[:, 0, 0]
    logits_BKGS = jnp.where(mask_BS[:, None, None], logits_BKGS, jnp.finfo(jnp.float32).min)
  probs_BKGS = jax.nn.softmax(logits_BKGS, axis=-1)
  out_BKGH = einsum("bkgs,bksh->bkgh", probs_BKGS, v_BKSH, dtype)
  return out_BKGH.reshape(B, 1, N, H)


class Attention(nnx.Module):
  """Self- or cross-attention (`cross=True`) with q/k/v/o projections named as in most HF
  ports. Called with a KVCache (layers/kv_cache.py) it decodes incrementally: the same
  code path serves a prefill of many tokens and a decode step of one."""

  def __init__(self, hidden_size: int, num_heads: int, *, num_kv_heads: int | None = None,
               head_dim: int | None = None, use_bias: bool = True, out_bias: bool | None = None,
               dropout_rate: float = 0.0, init_std: float = 0.02, impl: str = "xla",
               rope: RoPE | None = None, alibi: ALiBi | None = None,
               dense_bias: bool = False,
               scale: float | None = None, softcap: float | None = None,
               q_norm: nnx.Module | None = None, k_norm: nnx.Module | None = None,
               clip: float | None = None, cross: bool = False, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    """`q_norm`, `k_norm`: norms over each head's [.., head_dim] queries / keys, applied
    before RoPE (Qwen3, Gemma 3, Cohere); block.attention builds them from the config.
    `alibi`: the ALiBi spec of the `bias` callers pass (None: no ALiBi). `clip`: q, k and
    v clamped to [-clip, clip] after their projections (DBRX)."""
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads or num_heads
    self.head_dim = head_dim or hidden_size // num_heads
    kw = dict(init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    q_dim, kv_dim = num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    self.q = Dense(hidden_size, q_dim, use_bias=use_bias, axes=("embed", "heads"), **kw)
    self.k = Dense(hidden_size, kv_dim, use_bias=use_bias, axes=("embed", "kv_heads"), **kw)
    self.v = Dense(hidden_size, kv_dim, use_bias=use_bias, axes=("embed", "kv_heads"), **kw)
    self.o = Dense(q_dim, hidden_size, use_bias=use_bias if out_bias is None else out_bias,
                   axes=("heads", "embed"), **kw)
    self.q_norm, self.k_norm = q_norm, k_norm
    self.dropout_rate = dropout_rate
    # alibi: the `bias` callers pass is ALiBi, which the kernels compute from slopes.
    self.impl = resolve_impl(impl, dense_bias=dense_bias, softcap=softcap is not None,
                             dtype=dtype)
    self.alibi = alibi  # static spec: computes the bias from cached positions too
    self.rope = rope  # static spec: lets callers pass position_ids instead of cos/sin
    self.scale = scale
    self.softcap = softcap  # cap * tanh(logits / cap) on the scaled logits (Gemma 2)
    self.clip = clip  # q, k, v clamped to [-clip, clip] after projection (DBRX clip_qkv)
    self.cross = cross
    self.dtype = dtype

  def init_cache(self, batch_size: int, size: int, dtype=None) -> KVCache:
    """An empty cache of `size` slots (for cross-attention: the encoder length)."""
    return KVCache.init(batch_size, size, self.num_kv_heads, self.head_dim, dtype or self.dtype)

  def __call__(self, x_BTD, *, mask=None, kv_BSD=None, rope=None, position_ids=None,
               bias=None, cache: KVCache | None = None, rngs: nnx.Rngs | None = None):
    """Attends from x to kv (default: x itself); returns (cache, out [B, T, D]).

    Args:
      mask: a MaskSpec, or bool broadcastable to [B, 1, T, S] (True = attend; xla only).
        With a cache, a MaskSpec: its causal flag and window apply to the cached
        positions, and its kv_segment_ids (0 = padding) mark which new tokens are real.
      rope: (cos, sin), each [B, T, R], rotating the first R dims of q and k. Self-attention
        only: keys share the queries' positions (a KV cache stores keys already rotated).
      position_ids: [B, T]; with a `rope` spec given at construction, builds (cos, sin).
        Required with a cache: the positions of the new tokens.
      bias: additive logits bias broadcastable to [B, N, T, S] (ALiBi); with a cache, a
        function (q_positions [B, T], k_positions [B, S]) -> bias (T5's buckets), since
        only the cache knows the keys' positions. ALiBi is computed here from them.
      cache: this layer's KVCache (None: no incremental decoding; then returned as None).
        Cross-attention fills it from `kv_BSD` once and reads it when kv_BSD is None.
    """
    B, T, _ = x_BTD.shape
    heads = ("batch", "length", "heads", "head_dim")
    q_BTNH = constrain(self._clip(self.q(x_BTD)).reshape(B, T, self.num_heads, self.head_dim),
                       heads)
    if self.q_norm is not None:
      q_BTNH = self.q_norm(q_BTNH).astype(q_BTNH.dtype)
    if cache is not None and self.cross and kv_BSD is None:  # encoder K/V already cached
      k_BSKH = v_BSKH = None  # _attend_cached reads them from the cache
    else:
      k_BSKH, v_BSKH = self._kv(x_BTD if kv_BSD is None else kv_BSD)
    if rope is None and position_ids is not None and self.rope is not None:
      rope = self.rope(position_ids)
    if rope is not None:
      cos_BTR, sin_BTR = rope
      pairs = self.rope is not None and self.rope.interleaved
      q_BTNH = apply_rope(q_BTNH, cos_BTR, sin_BTR, pairs)
      k_BSKH = apply_rope(k_BSKH, cos_BTR, sin_BTR, pairs)
    if cache is None:
      out_BTNH = self._attend(q_BTNH, k_BSKH, v_BSKH, mask, bias, rngs)
    else:
      cache, out_BTNH = self._attend_cached(q_BTNH, k_BSKH, v_BSKH, mask, bias, cache,
                                            position_ids, fresh=kv_BSD is not None)
    return cache, self.o(out_BTNH.reshape(B, T, self.num_heads * self.head_dim))

  def _clip(self, x):
    return x if self.clip is None else jnp.clip(x, -self.clip, self.clip)

  def _kv(self, kv_BSD):
    B, S, _ = kv_BSD.shape
    kv_heads = ("batch", "length", "kv_heads", "head_dim")
    shape = (B, S, self.num_kv_heads, self.head_dim)
    k_BSKH = constrain(self._clip(self.k(kv_BSD)).reshape(shape), kv_heads)
    v_BSKH = constrain(self._clip(self.v(kv_BSD)).reshape(shape), kv_heads)
    if self.k_norm is not None:
      k_BSKH = self.k_norm(k_BSKH).astype(k_BSKH.dtype)
    return k_BSKH, v_BSKH

  def _attend_cached(self, q_BTNH, k_BTKH, v_BTKH, mask, bias, cache, q_pos_BT, fresh):
    """Incremental attention through the cache (the XLA path: decoding reads the whole
    cache once per step, which no kernel speeds up much)."""
    spec = mask if isinstance(mask, MaskSpec) else MaskSpec()
    if self.cross:  # keys: the encoder states, real where kv_segment_ids > 0
      if fresh:
        S = k_BTKH.shape[1]
        real_BS = (spec.kv_segment_ids > 0 if spec.kv_segment_ids is not None
                   else jnp.ones(k_BTKH.shape[:2], bool))
        cache = KVCache(k_BTKH.swapaxes(1, 2).astype(cache.k.dtype),
                        v_BTKH.swapaxes(1, 2).astype(cache.v.dtype),
                        jnp.where(real_BS, jnp.arange(S), -1).astype(jnp.int32),
                        jnp.asarray(S, jnp.int32))
      k_, v_, k_pos_BS = cache.k, cache.v, cache.pos  # [B, K, S, H]
      dense = (k_pos_BS >= 0)[:, None, None, :]
      q_pos_BT = None
    else:
      if q_pos_BT is None:
        raise ValueError("Attention with a KV cache needs the position_ids of the new tokens")
      real_BT = (spec.kv_segment_ids > 0 if spec.kv_segment_ids is not None
                 else jnp.ones(q_pos_BT.shape, bool))
      new_pos_BT = jnp.where(real_BT, q_pos_BT, -1).astype(jnp.int32)
      if k_BTKH.shape[1] == 1:  # decoding: write, then read the cache
        cache = cache.write(k_BTKH, v_BTKH, new_pos_BT)
        k_, v_, k_pos_BS = cache.k, cache.v, cache.pos  # [B, K, S, H]
      else:  # prefill: the new keys join the cache's (slots they overwrite included)
        # In [B, S, K, H]: concatenating [B, K, S, H] and transposing after made XLA:CPU
        # compile a bf16 dot it has no kernel for.
        cat = lambda old, new: jnp.concatenate([old.swapaxes(1, 2), new.astype(old.dtype)], 1)
        k_, v_ = cat(cache.k, k_BTKH), cat(cache.v, v_BTKH)
        k_pos_BS = jnp.concatenate([cache.pos, new_pos_BT], axis=1)
        cache = cache.write(k_BTKH, v_BTKH, new_pos_BT)
      dense = cached_mask(q_pos_BT, k_pos_BS, causal=spec.causal, window=spec.window)
    if self.alibi is not None:
      bias = self.alibi(k_pos_BS)
    elif callable(bias):
      bias = bias(q_pos_BT, k_pos_BS)
    # k_, v_: the cache's [B, K, S, H], except a self-attention prefill's [B, S, K, H].
    k_, v_ = k_.astype(q_BTNH.dtype), v_.astype(q_BTNH.dtype)
    if q_BTNH.shape[1] == 1:
      out = decode_attention(q_BTNH, k_, v_, dense, bias=bias, dtype=self.dtype,
                             scale=self.scale, softcap=self.softcap)
    else:
      if self.cross:
        k_, v_ = k_.swapaxes(1, 2), v_.swapaxes(1, 2)
      out = dot_product_attention(q_BTNH, k_, v_, dense,
                                  bias=bias, dtype=self.dtype, scale=self.scale,
                                  softcap=self.softcap)
    return cache, out

  def _attend(self, q_BTNH, k_BSKH, v_BSKH, mask, bias, rngs):
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    spec = mask if isinstance(mask, MaskSpec) else None
    dense = spec.dense(T, S) if spec is not None else mask
    train_dropout = rngs is not None and self.dropout_rate > 0
    if self.impl == "xla" or train_dropout:  # attention dropout: the reference path
      return dot_product_attention(q_BTNH, k_BSKH, v_BSKH, dense, bias=bias,
                                   dropout_rate=self.dropout_rate, rngs=rngs,
                                   dtype=self.dtype, scale=self.scale, softcap=self.softcap)
    if self.impl == "cudnn":
      # The model's own half dtype (resolve_impl refuses float32 models here).
      kw = {} if bias is None else {"bias": bias.astype(self.dtype)}
      out = jax.nn.dot_product_attention(
          q_BTNH.astype(self.dtype), k_BSKH.astype(self.dtype), v_BSKH.astype(self.dtype),
          mask=dense, scale=self.scale, implementation="cudnn", **kw)
      return out.astype(jnp.float32)
    from jaxlm.kernels import flash_attention  # noqa: PLC0415 (Pallas: only when chosen)
    if spec is None and mask is not None:
      raise ValueError("Attention(impl='pallas') needs a MaskSpec, not a dense mask")
    if bias is not None and self.alibi is None:
      raise ConfigError("model.attention_impl='pallas' cannot add a dense attention bias")
    segments = None
    if spec is not None and spec.kv_segment_ids is not None:
      segments = (spec.q_segment_ids, spec.kv_segment_ids)
    out = flash_attention(
        q_BTNH.astype(self.dtype), k_BSKH.astype(self.dtype), v_BSKH.astype(self.dtype),
        causal=spec is not None and spec.causal,
        sliding_window=spec.window if spec is not None else None,
        segment_ids=segments, sm_scale=self.scale, logits_soft_cap=self.softcap,
        alibi_slopes=self.alibi.slopes() if self.alibi is not None and bias is not None
        else None)
    return out.astype(jnp.float32)
