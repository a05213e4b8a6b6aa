"""The KV cache of incremental decoding: one `KVCache` per attention layer.

Keys are stored already rotated (RoPE) and are never repeated across query heads (GQA/MQA:
K heads). Every slot remembers the position of the token it holds (-1: empty, or
padding), so masks and position biases (ALiBi, T5 buckets) are computed from the cached
positions and each row of a left-padded batch keeps its own length.

Columns are written in order and shared by the rows of a batch (`index` columns so far);
column t lands in slot t % S. With S = the whole sequence nothing is overwritten; a
sliding-window model (Mistral) sizes S to its window, and a new column replaces one that
no later query can see (positions W apart), so memory stays at `window` slots however
long the output grows.

A serving engine (jaxlm/serve) gives each row its own `index` ([B], `per_row`): rows then
hold unrelated requests that started at different times, and `put_row` swaps one in.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
  k: jax.Array  # [B, K, S, H]: a decode step's products are then plain batched matmuls
  v: jax.Array  # [B, K, S, H]
  pos: jax.Array  # [B, S] int32: position of each slot's token; -1 = empty or padding
  index: jax.Array  # [] int32: columns written so far ([B] after per_row)

  @classmethod
  def init(cls, batch_size: int, size: int, num_kv_heads: int, head_dim: int,
           dtype=jnp.float32) -> KVCache:
    kv = jnp.zeros((batch_size, num_kv_heads, size, head_dim), dtype)
    return cls(kv, kv, jnp.full((batch_size, size), -1, jnp.int32), jnp.zeros((), jnp.int32))

  @property
  def size(self) -> int:
    return self.k.shape[2]

  @property
  def lengths(self) -> jax.Array:
    """Tokens cached per row, [B] (at most `size`)."""
    return (self.pos >= 0).sum(1)

  def write(self, k_BTKH, v_BTKH, pos_BT) -> KVCache:
    """Appends T columns (positions pos_BT, -1 for padding); returns the new cache."""
    T, S = k_BTKH.shape[1], self.size
    k_BKTH, v_BKTH = k_BTKH.swapaxes(1, 2), v_BTKH.swapaxes(1, 2)
    if T == 1 and self.index.ndim:  # each row at its own column
      rows_B, slot_B = jnp.arange(self.k.shape[0]), self.index % S
      put = lambda buf, new: buf.at[rows_B, :, slot_B].set(new[:, :, 0].astype(buf.dtype))
      return KVCache(put(self.k, k_BKTH), put(self.v, v_BKTH),
                     self.pos.at[rows_B, slot_B].set(pos_BT[:, 0]), self.index + 1)
    if self.index.ndim:
      raise ValueError("a per-row KVCache takes one column at a time; prefill a fresh "
                       "cache and put_row it")
    if T == 1:  # decoding: one in-place slice update
      slot = self.index % S
      upd = lambda buf, new, axis: jax.lax.dynamic_update_slice_in_dim(
          buf, new.astype(buf.dtype), slot, axis=axis)
      return KVCache(upd(self.k, k_BKTH, 2), upd(self.v, v_BKTH, 2), upd(self.pos, pos_BT, 1),
                     self.index + 1)
    keep = min(T, S)  # of a prompt longer than the cache, only its last S columns stay
    slots = (self.index + T - keep + jnp.arange(keep)) % S
    put = lambda buf, new: buf.at[:, :, slots].set(new[:, :, T - keep:].astype(buf.dtype))
    return KVCache(put(self.k, k_BKTH), put(self.v, v_BKTH),
                   self.pos.at[:, slots].set(pos_BT[:, T - keep:]), self.index + T)

  def per_row(self) -> KVCache:
    """The same cache with a write column per row."""
    return self.replace(index=jnp.broadcast_to(self.index, self.pos.shape[:1]))

  def put_row(self, row, other: KVCache) -> KVCache:
    """Row `row` replaced by `other`'s only row (a prefilled one-row cache of this size)."""
    put = lambda buf, new: jax.lax.dynamic_update_index_in_dim(buf, new[0].astype(buf.dtype),
                                                               row, 0)
    return KVCache(put(self.k, other.k), put(self.v, other.v), put(self.pos, other.pos),
                   self.index.at[row].set(other.index))


def cached_mask(q_pos_BT, k_pos_BS, *, causal: bool, window: int | None):
  """Boolean [B, 1, T, S]: real keys (position >= 0), at or before the query when causal,
  fewer than `window` positions back."""
  q, k = q_pos_BT[:, :, None], k_pos_BS[:, None, :]
  ok = k >= 0
  if causal:
    ok &= k <= q
  if window is not None:
    ok &= q - k < window
  return ok[:, None]
