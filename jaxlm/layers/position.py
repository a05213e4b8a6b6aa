"""Position encodings: RoPE (with linear / llama3 / longrope scaling), ALiBi, sinusoidal
tables and T5's bucketed relative-position bias.

Learned absolute positions need nothing here: they are an `Embed` indexed by position id.
Everything static (inverse frequencies, slopes) is computed in NumPy float32 once per
config, mirroring the Hugging Face arithmetic so imported checkpoints match bit-closely;
only the position-dependent part is traced.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


# ---- RoPE ------------------------------------------------------------------------------
def rotary_dim(head_dim: int, partial_rotary_factor: float = 1.0) -> int:
  """How many leading dims of each head rotate (GPT-NeoX rotates only a fraction)."""
  return int(head_dim * partial_rotary_factor)


def _scaling_key(scaling: dict | None) -> tuple:
  # lru_cache needs hashable arguments; the scaling dict is tiny (longrope's factor lists
  # become tuples).
  return tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                      for k, v in (scaling or {}).items()))


@functools.lru_cache(maxsize=64)
def _inv_freq(dim: int, theta: float, scaling_items: tuple) -> np.ndarray:
  scaling = dict(scaling_items)
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  # Same float32 expression as HF: 1 / theta^(2i/dim).
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)
  if kind == "linear":
    # Scaling the frequencies == dividing the positions by `factor`.
    return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
  if kind == "llama3":
    return _llama3_inv_freq(inv_freq, scaling)
  if kind == "longrope":  # the short factors; _longrope has both sets
    return _longrope_inv_freq(dim, theta, scaling["short_factor"])
  return inv_freq


def _longrope_inv_freq(dim: int, theta: float, ext_factors) -> np.ndarray:
  """HF `_compute_longrope_parameters`: 1 / (ext_i * theta^(2i/dim)), in float32."""
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  ext = np.asarray(ext_factors, np.float32)
  return (np.float32(1.0) / (ext * np.power(np.float32(theta), exponents))).astype(np.float32)


def longrope_attention_factor(scaling: dict, max_position_embeddings: int) -> float:
  """The factor cos and sin are multiplied by: `attention_factor` if given, else
  sqrt(1 + ln(factor) / ln(original_max)) with `factor` defaulting to
  max_position_embeddings / original_max (what Phi-3 configs rely on); 1 when factor <= 1."""
  if scaling.get("attention_factor") is not None:
    return float(scaling["attention_factor"])
  orig = scaling["original_max_position_embeddings"]
  factor = scaling.get("factor")
  factor = max_position_embeddings / orig if factor is None else factor
  return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))


def _llama3_inv_freq(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
  """HF `_compute_llama3_parameters`: long wavelengths slow down by `factor`, short ones
  stay, and the band in between interpolates smoothly."""
  factor = scaling["factor"]
  low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
  old_len = scaling["original_max_position_embeddings"]
  low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
  wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq)
  smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
  smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
  is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_inv_freq(dim: int, theta: float = 10000.0, scaling: dict | None = None) -> np.ndarray:
  """Inverse frequencies [dim // 2] for `dim` rotary dims (float32, HF-identical)."""
  return _inv_freq(dim, float(theta), _scaling_key(scaling)).copy()


def rope_cos_sin(position_ids_BT, dim: int, theta: float = 10000.0,
                 scaling: dict | None = None, interleaved: bool = False):
  """cos/sin tables [B, T, dim] for integer positions, in HF's duplicated-halves layout
  (f0 f1 .. f0 f1 ..), or with `interleaved` each frequency twice in a row (f0 f0 f1 f1 ..:
  Cohere, where dims 2i and 2i+1 rotate together).

  longrope (which needs `attention_factor` resolved, see RoPE.create) picks one factor
  set per call, as transformers' `longrope_frequency_update` does: the long factors iff
  the largest position in the batch is at or past original_max_position_embeddings, so
  the same token rotates differently in a short and a long call. A KV cache therefore
  holds keys rotated with the factors of the call that wrote them, as in transformers,
  whose Phi-3 generate recomputes the cache when it crosses the switch (so does
  jaxlm.generate; see generate/request.py).
  """
  inv_freq_F = jnp.asarray(_inv_freq(dim, float(theta), _scaling_key(scaling)))
  kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
  if kind == "longrope":
    long_F = jnp.asarray(_longrope_inv_freq(dim, float(theta), scaling["long_factor"]))
    seq_len = jnp.max(position_ids_BT) + 1
    inv_freq_F = jnp.where(seq_len > scaling["original_max_position_embeddings"], long_F,
                           inv_freq_F)
  freqs_BTF = position_ids_BT[..., None].astype(jnp.float32) * inv_freq_F
  if interleaved:
    emb_BTR = jnp.repeat(freqs_BTF, 2, axis=-1)
  else:
    emb_BTR = jnp.concatenate([freqs_BTF, freqs_BTF], axis=-1)
  cos_BTR, sin_BTR = jnp.cos(emb_BTR), jnp.sin(emb_BTR)
  if kind == "longrope":
    if scaling.get("attention_factor") is None:
      raise ValueError("longrope cos/sin need the resolved attention_factor (RoPE.create)")
    scale = np.float32(scaling["attention_factor"])
    cos_BTR, sin_BTR = cos_BTR * scale, sin_BTR * scale
  return cos_BTR, sin_BTR


@dataclasses.dataclass(frozen=True)
class RoPE:
  """A rotary embedding spec; hashable, so it can sit on an nnx Module as static data."""

  dim: int  # rotary dims per head (even)
  theta: float = 10000.0
  scaling: tuple = ()  # sorted (key, value) items of the HF rope_scaling dict
  interleaved: bool = False  # pairs (2i, 2i+1) rotate together, not (i, i + dim/2)

  @classmethod
  def create(cls, head_dim: int, *, theta: float = 10000.0, partial_rotary_factor: float = 1.0,
             scaling: dict | None = None, interleaved: bool = False,
             max_position_embeddings: int | None = None) -> RoPE:
    """`max_position_embeddings`: longrope's default factor is its ratio to the original
    length; the resolved attention_factor joins the spec."""
    scaling = dict(scaling or {})
    if scaling.get("rope_type", scaling.get("type")) == "longrope":
      if max_position_embeddings is None and scaling.get("attention_factor") is None:
        raise ValueError("longrope RoPE needs max_position_embeddings or attention_factor")
      scaling["attention_factor"] = longrope_attention_factor(scaling, max_position_embeddings)
    return cls(rotary_dim(head_dim, partial_rotary_factor), float(theta), _scaling_key(scaling),
               interleaved)

  def __call__(self, position_ids_BT):
    return rope_cos_sin(position_ids_BT, self.dim, self.theta, dict(self.scaling),
                        self.interleaved)


def rotate_half(x):
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rotate_pairs(x):
  """(x0, x1, x2, x3, ..) -> (-x1, x0, -x3, x2, ..): the interleaved layout's rotate_half."""
  x_P2 = x.reshape(*x.shape[:-1], -1, 2)
  return jnp.stack([-x_P2[..., 1], x_P2[..., 0]], axis=-1).reshape(x.shape)


def apply_rope(x_BTNH, cos_BTR, sin_BTR, interleaved: bool = False):
  """Rotates the first R dims of every head (R = cos.shape[-1]); the rest pass through.
  `interleaved`: the tables and the rotation pair dims (2i, 2i+1) (RoPE.interleaved)."""
  R = cos_BTR.shape[-1]
  x_rot, x_pass = x_BTNH[..., :R], x_BTNH[..., R:]
  cos, sin = cos_BTR[:, :, None, :], sin_BTR[:, :, None, :]
  x_rot = x_rot * cos + (rotate_pairs(x_rot) if interleaved else rotate_half(x_rot)) * sin
  if R == x_BTNH.shape[-1]:
    return x_rot
  return jnp.concatenate([x_rot, x_pass.astype(x_rot.dtype)], axis=-1)


# ---- ALiBi -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _alibi_slopes(num_heads: int) -> np.ndarray:
  # BLOOM's `_get_alibi_slopes`: geometric slopes for the closest power of two, then the
  # odd powers of the next finer sequence for the remaining heads.
  closest = 2 ** math.floor(math.log2(num_heads))
  base = np.float32(2 ** (-(2 ** -(math.log2(closest) - 3))))
  slopes = np.power(base, np.arange(1, 1 + closest, dtype=np.float32))
  if closest != num_heads:
    extra_base = np.float32(2 ** (-(2 ** -(math.log2(2 * closest) - 3))))
    remaining = min(closest, num_heads - closest)
    extra = np.power(extra_base, np.arange(1, 1 + 2 * remaining, 2, dtype=np.float32))
    slopes = np.concatenate([slopes, extra])
  return slopes.astype(np.float32)


def alibi_slopes(num_heads: int) -> np.ndarray:
  """Per-head ALiBi slopes [N] for any head count (identical to BLOOM, and to MPT with
  its default alibi_bias_max=8)."""
  return _alibi_slopes(num_heads).copy()


def alibi_bias(position_ids_BS, num_heads: int):
  """Additive logits bias slope * key_position: [B, N, 1, S].

  ALiBi proper is -slope * (i - j); the -slope * i part is constant along each query row,
  so softmax ignores it. That makes this form equal to BLOOM's (positions from the mask
  cumsum) and MPT's (positions offset by the sequence length) whenever masked keys are
  excluded and positions are contiguous within what a query can see.
  """
  return ALiBi(num_heads)(position_ids_BS)


@dataclasses.dataclass(frozen=True)
class ALiBi:
  """An ALiBi spec (hashable static data, like RoPE). style "bloom" (BLOOM, MPT): the bias
  slope * key_position in float32, added to the scaled logits. "falcon" (transformers'
  Falcon): slopes and each slope * position are rounded to bfloat16, and the bias is
  scaled by 1/sqrt(head_dim) like the logits (as if added before the scaling)."""

  num_heads: int
  style: str = "bloom"
  head_dim: int = 1  # "falcon" only

  def _falcon_div(self) -> np.float32:
    return np.float32(math.sqrt(self.head_dim))  # divided by, as transformers does

  def slopes(self) -> np.ndarray:
    """Per-head slopes [N] of the bias as the flash kernel adds it (slope * (j - i')).
    "falcon": bf16(slope) / sqrt(head_dim); equal to __call__ wherever bf16(slope) * pos is
    exact in bfloat16 (power-of-two head counts up to 8, positions < 256)."""
    slopes = _alibi_slopes(self.num_heads)
    if self.style == "bloom":
      return slopes.copy()
    rounded = slopes.astype(jnp.bfloat16).astype(np.float32)  # NumPy: static, never traced
    return (rounded / self._falcon_div()).astype(np.float32)

  def __call__(self, position_ids_BS):
    """Additive logits bias [B, N, 1, S] for the keys' positions (see alibi_bias)."""
    slopes_N = jnp.asarray(_alibi_slopes(self.num_heads))
    if self.style == "bloom":
      pos_BS = position_ids_BS.astype(jnp.float32)
      return slopes_N[None, :, None, None] * pos_BS[:, None, None, :]
    # torch: bf16 slopes * int64 positions -> bf16. Both factors have <= 8 significant bits,
    # so their float32 product is exact and one rounding gives torch's bfloat16 result.
    slopes_N = round_to_bfloat16(slopes_N)
    pos_BS = round_to_bfloat16(position_ids_BS.astype(jnp.float32))
    bias_BN1S = round_to_bfloat16(slopes_N[None, :, None, None] * pos_BS[:, None, None, :])
    return bias_BN1S / self._falcon_div()


def round_to_bfloat16(x_f32):
  """float32 -> the nearest bfloat16 value (ties to even), kept in float32. Done on the bits:
  a convert pair may be dropped under jit (XLA's excess-precision default)."""
  bits = jax.lax.bitcast_convert_type(x_f32.astype(jnp.float32), jnp.uint32)
  bits = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & 1)) & jnp.uint32(0xFFFF0000)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


# ---- sinusoidal ------------------------------------------------------------------------
def sinusoidal_table(num_positions: int, dim: int) -> np.ndarray:
  """Fixed "Attention is all you need" table [P, D]: sin on even dims, cos on odd dims."""
  pos = np.arange(num_positions, dtype=np.float64)[:, None]
  inv = np.power(10000.0, -2.0 * (np.arange(dim) // 2) / dim)[None, :]
  angles = pos * inv
  table = np.zeros((num_positions, dim), np.float64)
  table[:, 0::2] = np.sin(angles[:, 0::2])
  table[:, 1::2] = np.cos(angles[:, 1::2])
  return table.astype(np.float32)


# ---- T5 relative position buckets --------------------------------------------------------
def relative_position_bucket(relative_position, *, bidirectional: bool, num_buckets: int = 32,
                             max_distance: int = 128):
  """T5's bucket of each relative position (key - query), as HF `_relative_position_bucket`.

  Bidirectional (encoder): half the buckets for keys after the query, half for those at or
  before it. Unidirectional (causal decoder): keys after the query all share bucket 0. Within
  a direction, distances below num_buckets // 2 get one bucket each, longer ones share
  log-spaced buckets up to `max_distance`, and everything beyond lands in the last bucket.
  """
  rel = jnp.asarray(relative_position).astype(jnp.int32)
  bucket = jnp.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    bucket = bucket + (rel > 0).astype(jnp.int32) * num_buckets
    dist = jnp.abs(rel)
  else:
    dist = -jnp.minimum(rel, 0)
  max_exact = num_buckets // 2
  # Same float32 expression and truncation as HF, so boundary distances land alike.
  # (Small distances would take log(0) here; `where` discards those lanes.)
  log_ratio = jnp.log(jnp.maximum(dist, 1).astype(jnp.float32) / max_exact)
  large = max_exact + (log_ratio / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(dist < max_exact, dist, large)


class RelativePositionBias(nnx.Module):
  """T5's learned [num_buckets, num_heads] table of attention-logit biases.

  One table serves every layer of a stack (T5 computes it in block 0 and reuses it).
  Taking positions rather than lengths lets a KV cache ask for the bias of new queries
  (positions t0..t0+T-1) against all cached keys.
  """

  def __init__(self, num_buckets: int, num_heads: int, *, bidirectional: bool,
               max_distance: int = 128, init_std: float = 0.02, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.embedding = nnx.Param(jax.random.normal(rngs.params(), (num_buckets, num_heads),
                                                 param_dtype) * init_std, axes=(None, "heads"))
    self.num_buckets = num_buckets
    self.bidirectional = bidirectional
    self.max_distance = max_distance

  def __call__(self, q_positions_T, k_positions_S):
    """Bias [1, N, T, S] for 1-D positions, or [B, N, T, S] for per-row [B, T] / [B, S]."""
    q_T1 = jnp.asarray(q_positions_T)[..., :, None]
    k_1S = jnp.asarray(k_positions_S)[..., None, :]
    buckets_TS = relative_position_bucket(k_1S - q_T1, bidirectional=self.bidirectional,
                                          num_buckets=self.num_buckets,
                                          max_distance=self.max_distance)
    values_TSN = jnp.take(self.embedding[...], buckets_TS, axis=0).astype(jnp.float32)
    bias_NTS = jnp.moveaxis(values_TSN, -1, -3)
    return bias_NTS if bias_NTS.ndim == 4 else bias_NTS[None]
