"""Multi-head attention (MHA / MQA / GQA) and the masks it consumes.

K/V heads are never repeated: queries are grouped as [B, T, K, G, H] so each of the
K key/value heads serves G = num_heads // K query heads. Masks are boolean arrays
broadcastable to [B, 1, T, S] (True = attend), built and combined with `&`. Position
information enters either by rotating q and k (RoPE) or as an additive logits bias
(ALiBi, relative-position buckets), which is added before masking.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.dropout import dropout
from jaxlm.layers.linear import Dense
from jaxlm.layers.position import RoPE, apply_rope
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


# ---- attention -------------------------------------------------------------------------
def dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask, *, bias=None, dropout_rate=0.0,
                          rngs=None, dtype=jnp.float32, scale: float | None = None):
  """Softmax attention in float32 with grouped K/V heads; returns [B, T, N, H].

  `bias` (float, broadcastable to [B, N, T, S], e.g. ALiBi [1|B, N, 1, S]) is added to
  the scaled logits before the mask. `scale` defaults to 1/sqrt(H) (T5 uses 1: its
  initialization folds the scaling into the query weights).
  """
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  G = N // K
  q_BTKGH = q_BTNH.reshape(B, T, K, G, H) * (H ** -0.5 if scale is None else scale)
  logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH.astype(dtype), k_BSKH.astype(dtype),
                            preferred_element_type=jnp.float32)
  if bias is not None:
    # Query head n = k * G + g, matching the reshape of q above.
    b, n, t, s = bias.shape
    bias_bKGtS = bias.astype(jnp.float32).reshape(b, K, G, t, s) if n == N else bias[:, :, None]
    logits_BKGTS = logits_BKGTS + bias_bKGtS
  if mask is not None:
    mask_B1TS = mask if mask.ndim == 4 else mask[:, None]
    logits_BKGTS = jnp.where(mask_B1TS[:, :, None], logits_BKGTS,
                             jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1)
  probs_BKGTS = dropout(probs_BKGTS, dropout_rate, rngs)
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS.astype(dtype), v_BSKH.astype(dtype),
                         preferred_element_type=jnp.float32)
  return out_BTKGH.reshape(B, T, N, H)


class Attention(nnx.Module):
  """Self- or cross-attention with q/k/v/o projections named as in most HF ports."""

  def __init__(self, hidden_size: int, num_heads: int, *, num_kv_heads: int | None = None,
               head_dim: int | None = None, use_bias: bool = True, out_bias: bool | None = None,
               dropout_rate: float = 0.0, init_std: float = 0.02, backend: str = "xla",
               rope: RoPE | None = None, scale: float | None = None, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
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
    self.dropout_rate = dropout_rate
    self.backend = backend
    self.rope = rope  # static spec: lets callers pass position_ids instead of cos/sin
    self.scale = scale
    self.dtype = dtype

  def __call__(self, x_BTD, *, mask=None, kv_BSD=None, rope=None, position_ids=None,
               bias=None, rngs: nnx.Rngs | None = None):
    """Attends from x to kv (default: x itself).

    Args:
      mask: bool, broadcastable to [B, 1, T, S]; True = attend.
      rope: (cos, sin), each [B, T, R], rotating the first R dims of q and k. Self-attention
        only: keys share the queries' positions (a KV cache stores keys already rotated).
      position_ids: [B, T]; with a `rope` spec given at construction, builds (cos, sin).
      bias: additive logits bias broadcastable to [B, N, T, S] (ALiBi).
    """
    kv_BSD = x_BTD if kv_BSD is None else kv_BSD
    B, T, _ = x_BTD.shape
    S = kv_BSD.shape[1]
    heads = ("batch", "length", "heads", "head_dim")
    kv_heads = ("batch", "length", "kv_heads", "head_dim")
    q_BTNH = constrain(self.q(x_BTD).reshape(B, T, self.num_heads, self.head_dim), heads)
    k_BSKH = constrain(self.k(kv_BSD).reshape(B, S, self.num_kv_heads, self.head_dim), kv_heads)
    v_BSKH = constrain(self.v(kv_BSD).reshape(B, S, self.num_kv_heads, self.head_dim), kv_heads)
    if rope is None and position_ids is not None:
      if self.rope is None:
        raise ValueError("Attention: position_ids given but no rope spec at construction")
      rope = self.rope(position_ids)
    if rope is not None:
      cos_BTR, sin_BTR = rope
      q_BTNH, k_BSKH = apply_rope(q_BTNH, cos_BTR, sin_BTR), apply_rope(k_BSKH, cos_BTR, sin_BTR)
    out_BTNH = dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask, bias=bias,
                                     dropout_rate=self.dropout_rate, rngs=rngs, dtype=self.dtype,
                                     scale=self.scale)
    return self.o(out_BTNH.reshape(B, T, self.num_heads * self.head_dim))
