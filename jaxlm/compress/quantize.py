"""Weight-only quantization by module swap: `quantize(model, "int8" | "int4" | "bf16")`.

Every `Dense` becomes a `QuantDense` and every `Embed` a `QuantEmbed` (a tied LM head is
its token table, so it is quantized with it), as `jaxlm.peft.lora` swaps in its LoRADense:
no layer takes a quantization argument. The float weights are dropped; only the codes and
their scales are kept. A weight W [K in, N out] is stored as:

  int8  qweight int8 [nb, K, B]     scales f32 [nb, B]: symmetric, per output channel
  int4  qweight int8 [nb, K/2, B]   scales f32 [nb, K/G, B] (+ zeros uint8 [nb, K/G, B]
        when asymmetric; qweight is then uint8): per group of G = group_size inputs,
        two codes a byte: within each group, the low nibbles hold its first G/2 rows and
        the high nibbles the last G/2
  bf16  qweight uint32 [nb, K/2, B]: two bfloat16 a word, rows [0, K/2) in the low half

with the output columns in nb blocks of B (`block_size`, the last block zero-padded).

Why this layout: on XLA:CPU (jax 0.10, a 2-core Intel Xeon with AMX), x [1, 768] @
W.astype(f32) with W int8 or bf16 [768, 12288] took 16 ms against 1.5 ms for an f32 W: it
writes a whole f32 copy of W before the dot. Qwix (PyPI qwix 0.1.8, tried first) does
the same (16 ms int8, 22 ms int4 weight-only), and its interception of lax.dot_general
does not reach jaxlm's Dense (quantize_model failed with a TraceContextError). A
`lax.scan` over column blocks converts one [K, B] block at a time, which stays in cache,
and runs the dot on the fast path: 1.1 ms int8, 1.2-1.3 ms int4, 1.5 ms bf16; at GPT-2's
head [768, 50257], 4.4 / 4.5-5.9 / 8.0 ms against 9.6 ms for f32
(benchmarks/compress_quant.py, "matmul"). The blocks are contiguous ([nb, K, B]); slicing
them out of a [K, N] layout cost 4x. The int4 nibbles are split with int8 shifts and
multiplied as two half-matmuls (low rows, high rows), never concatenated (concatenating
cost 7x); bf16 pairs in a uint32 become f32 by a shift and a bitcast (converting bfloat16
directly was 10x slower). Nothing float of the size of a weight is ever stored.

int8 applies its per-channel scale after the dot; int4 scales (and shifts) each block in
f32 before it. The compute dtype (Runtime.dtype) is honoured for the dot's operands.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.errors import ConfigError, DataError
from jaxlm.layers.embed import Embed, scaled
from jaxlm.layers.linear import Dense
from jaxlm.layers.vocab_loss import head_logits
from jaxlm.params import path_name

MODES = ("int8", "int4", "bf16")
BLOCK_SIZE = 128  # output columns per scan step
QUANT_METHOD = "jaxlm"  # quantization_config["quant_method"] of our exports
FORMAT_VERSION = 1
_INT4_RANGE = {True: (-8, 7), False: (0, 15)}  # symmetric, asymmetric code ranges


# ---- specs and configs -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How one weight W [in_features, out_features] is stored (static, hashable)."""

  mode: str
  in_features: int
  out_features: int
  group_size: int = 0  # int4 only
  symmetric: bool = True  # int4 only; int8 is always symmetric
  block: int = BLOCK_SIZE  # output columns per block (min(block_size, out_features))

  @property
  def num_blocks(self) -> int:
    return -(-self.out_features // self.block)

  @property
  def groups(self) -> int:
    return self.in_features // self.group_size


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """What `quantize` was asked; saved as config.json's `quantization_config`."""

  mode: str
  group_size: int = 128
  symmetric: bool = False  # int4: a zero point per group (measured better, same speed)
  embeddings: bool = True
  block_size: int = BLOCK_SIZE

  def __post_init__(self):
    if self.mode not in MODES:
      raise ConfigError(f"quantize mode {self.mode!r}: choose one of {', '.join(MODES)}")
    for key in ("group_size", "block_size"):
      v = getattr(self, key)
      if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"quantize {key} must be a positive integer, got {v!r}")
    if self.mode == "int4" and self.group_size % 2:
      raise ConfigError(f"quantize group_size={self.group_size}: int4 needs an even group "
                        "(two codes a byte within each group)")

  def to_json(self) -> dict:
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
            **dataclasses.asdict(self)}

  @classmethod
  def from_json(cls, d: Any, source: str) -> QuantConfig:
    """The config a saved `quantization_config` describes; a foreign or bad one is a
    DataError naming `source`."""
    if not isinstance(d, dict) or d.get("quant_method") != QUANT_METHOD:
      method = d.get("quant_method") if isinstance(d, dict) else d
      raise DataError(f"{source}: quantization_config with quant_method={method!r} is not "
                      f"supported (jaxlm reads its own, quant_method={QUANT_METHOD!r})")
    if d.get("format_version") != FORMAT_VERSION:
      raise DataError(f"{source}: quantization_config format_version "
                      f"{d.get('format_version')!r}; this jaxlm reads {FORMAT_VERSION}")
    known = {f.name for f in dataclasses.fields(cls)}
    try:
      return cls(**{k: v for k, v in d.items() if k in known})
    except (ConfigError, TypeError) as e:
      raise DataError(f"{source}: quantization_config: {e}") from None


def make_spec(cfg: QuantConfig, in_features: int, out_features: int, where: str) -> QuantSpec:
  """The QuantSpec of one weight; a shape the mode cannot store is a ConfigError naming
  the module (`where`)."""
  if cfg.mode == "int4" and in_features % cfg.group_size:
    raise ConfigError(f"quantize group_size={cfg.group_size} does not divide the input "
                      f"features of {where} ({in_features})")
  if cfg.mode == "bf16" and in_features % 2:
    raise ConfigError(f"quantize bf16 packs two rows a word: {where} has an odd number of "
                      f"input features ({in_features})")
  return QuantSpec(cfg.mode, in_features, out_features,
                   cfg.group_size if cfg.mode == "int4" else 0,
                   cfg.symmetric if cfg.mode == "int4" else True,
                   min(cfg.block_size, out_features))


# ---- quantizing and packing ------------------------------------------------------------
def _blocked(a_XN, spec: QuantSpec, fill=0):
  """[X, N] -> [nb, X, B], columns padded with `fill` to nb * B."""
  X, N = a_XN.shape
  nb, B = spec.num_blocks, spec.block
  a_XN = jnp.pad(a_XN, ((0, 0), (0, nb * B - N)), constant_values=fill)
  return a_XN.reshape(X, nb, B).transpose(1, 0, 2)


def _pack_nibbles(q_KN, spec: QuantSpec):
  """int4 codes [K, N] -> bytes [K/2, N]: per group, low nibble = first half of rows."""
  K, N = q_KN.shape
  G = spec.group_size
  q = q_KN.reshape(K // G, 2, G // 2, N)
  lo, hi = q[:, 0], q[:, 1]
  if spec.symmetric:
    packed = (lo & 0xF) | (hi << 4)  # int8, two's-complement nibbles
  else:
    packed = lo | (hi << 4)  # uint8
  return packed.reshape(K // 2, N)


def _nibbles(p, symmetric: bool):
  """Bytes -> (low, high) codes as integers of the same shape."""
  if symmetric:  # arithmetic shifts sign-extend each nibble
    four = jnp.int8(4)
    lo = jax.lax.shift_right_arithmetic(jax.lax.shift_left(p, four), four)
    return lo, jax.lax.shift_right_arithmetic(p, four)
  return p & jnp.uint8(0xF), p >> jnp.uint8(4)


@functools.partial(jax.jit, static_argnums=1)
def quantize_weight(w_KN, spec: QuantSpec) -> dict[str, jax.Array]:
  """The stored arrays (module docstring) of a float weight [K, N]."""
  w = jnp.asarray(w_KN).astype(jnp.float32)
  K, N = w.shape
  if spec.mode == "int8":
    amax_N = jnp.max(jnp.abs(w), axis=0)
    s_N = jnp.where(amax_N > 0, amax_N / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / s_N), -127, 127).astype(jnp.int8)
    return {"qweight": _blocked(q, spec), "scales": _blocked(s_N[None], spec, 1.0)[:, 0]}
  if spec.mode == "bf16":
    u = jax.lax.bitcast_convert_type(w.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32)
    return {"qweight": _blocked(u[:K // 2] | (u[K // 2:] << 16), spec)}
  G = spec.group_size
  w_gGN = w.reshape(K // G, G, N)
  lo_code, hi_code = _INT4_RANGE[spec.symmetric]
  if spec.symmetric:
    amax = jnp.max(jnp.abs(w_gGN), axis=1)
    s_gN = jnp.where(amax > 0, amax / 7.0, 1.0)
    q = jnp.round(w_gGN / s_gN[:, None])
    zeros = None
  else:
    wmin, wmax = jnp.min(w_gGN, axis=1), jnp.max(w_gGN, axis=1)
    s_gN = jnp.where(wmax > wmin, (wmax - wmin) / 15.0, 1.0)
    z_gN = jnp.clip(jnp.round(-wmin / s_gN), 0, 15)
    q = jnp.round(w_gGN / s_gN[:, None]) + z_gN[:, None]
    zeros = z_gN.astype(jnp.uint8)
  dtype = jnp.int8 if spec.symmetric else jnp.uint8
  q = jnp.clip(q, lo_code, hi_code).astype(dtype).reshape(K, N)
  out = {"qweight": _blocked(_pack_nibbles(q, spec), spec),
         "scales": _blocked(s_gN, spec, 1.0)}
  if zeros is not None:
    out["zeros"] = _blocked(zeros, spec)
  return out


def _int4_values(codes, scales, zeros, G: int):
  """Codes [..., X, B] of rows in groups of G/2 (one nibble half) -> f32 weights."""
  X, B = codes.shape[-2:]
  q = codes.astype(jnp.float32).reshape(*codes.shape[:-2], X // (G // 2), G // 2, B)
  if zeros is not None:
    q = q - zeros.astype(jnp.float32)[..., None, :]
  return (q * scales[..., None, :]).reshape(codes.shape)


def _bf16_halves(u):
  """uint32 pairs -> (low-half values, high-half values) as f32."""
  lo = jax.lax.bitcast_convert_type(u << jnp.uint32(16), jnp.float32)
  hi = jax.lax.bitcast_convert_type(u & jnp.uint32(0xFFFF0000), jnp.float32)
  return lo, hi


def _block_weights(blk: dict, spec: QuantSpec) -> list:
  """One block's f32 weight parts, each [K_part, B], matching `_split_x`'s parts (int8:
  the codes, scaled after the dot)."""
  q = blk["qweight"]
  if spec.mode == "int8":
    return [q.astype(jnp.float32)]
  if spec.mode == "bf16":
    return list(_bf16_halves(q))
  lo, hi = _nibbles(q, spec.symmetric)
  z = blk.get("zeros")
  return [_int4_values(c, blk["scales"], z, spec.group_size) for c in (lo, hi)]


def _split_x(x_MK, spec: QuantSpec) -> list:
  """The activation parts that `_block_weights`' parts multiply."""
  M, K = x_MK.shape
  if spec.mode == "int8":
    return [x_MK]
  if spec.mode == "bf16":
    return [x_MK[:, :K // 2], x_MK[:, K // 2:]]
  G = spec.group_size
  x = x_MK.reshape(M, K // G, 2, G // 2)
  return [x[:, :, 0].reshape(M, K // 2), x[:, :, 1].reshape(M, K // 2)]


def qmatmul(x, arrays: dict, spec: QuantSpec, dtype=jnp.float32):
  """x [..., K] @ W [K, N] -> float32 [..., N], W read from its quantized `arrays` one
  column block at a time (operands in `dtype`, float32 accumulation)."""
  K, N = spec.in_features, spec.out_features
  if x.shape[-1] != K:
    raise ConfigError(f"quantized matmul: input has {x.shape[-1]} features, the weight {K}")
  lead = x.shape[:-1]
  xs = [p.astype(dtype) for p in _split_x(x.reshape(-1, K), spec)]

  def block(blk):
    ws = _block_weights(blk, spec)
    y = sum(jnp.matmul(xp, w.astype(dtype), preferred_element_type=jnp.float32)
            for xp, w in zip(xs, ws))
    return y * blk["scales"][None] if spec.mode == "int8" else y

  if spec.num_blocks == 1:
    y_MN = block({k: v[0] for k, v in arrays.items()})
  else:
    _, y_nMB = jax.lax.scan(lambda c, blk: (c, block(blk)), None, arrays)
    y_MN = y_nMB.transpose(1, 0, 2).reshape(y_nMB.shape[1], -1)
  return y_MN[:, :N].reshape(*lead, N)


def gather_columns(arrays: dict, spec: QuantSpec, ids):
  """Columns `ids` of W as float32 rows [..., K]: an embedding lookup when W is a token
  table stored transposed (QuantEmbed)."""
  ids = jnp.asarray(ids)
  b, c = ids // spec.block, ids % spec.block
  cols = {k: v[b, :, c] if v.ndim == 3 else v[b, c] for k, v in arrays.items()}
  q = cols["qweight"]  # [..., K or K/2]
  if spec.mode == "int8":
    return q.astype(jnp.float32) * cols["scales"][..., None]
  if spec.mode == "bf16":
    return jnp.concatenate(_bf16_halves(q), axis=-1)
  G, lead = spec.group_size, q.shape[:-1]
  z = cols.get("zeros")
  # Columns as [..., K/2, 1] so `_int4_values` sees a block of one column.
  halves = [_int4_values(h[..., None], cols["scales"][..., None],
                        None if z is None else z[..., None], G)
            for h in _nibbles(q, spec.symmetric)]
  halves = [h.reshape(*lead, spec.groups, G // 2) for h in halves]
  return jnp.stack(halves, axis=-2).reshape(*lead, spec.in_features)


def dequantize(arrays: dict, spec: QuantSpec):
  """The float32 weight [K, N] the arrays hold (for tests and the training loss path)."""
  return gather_columns(arrays, spec, jnp.arange(spec.out_features)).T


# ---- modules ----------------------------------------------------------------------------
def _params(arrays: dict, mode: str) -> dict[str, nnx.Param]:
  """nnx.Params of the stored arrays; the weight codes carry `quant=mode` (for byte
  counts by format: an int4 byte is two weights)."""
  out = {}
  for name, a in arrays.items():
    meta = {"quant": mode} if name == "qweight" else {}
    out[name] = nnx.Param(a, axes=(None,) * a.ndim, **meta)
  return out


@flax.struct.dataclass
class QuantProjection:
  """layers.vocab_loss.Projection's interface for a quantized head: `logits()` runs the
  blocked matmul; `w` dequantizes the whole table (the fused training loss reads it)."""

  h: Any
  arrays: Any
  spec: QuantSpec = flax.struct.field(pytree_node=False)
  bias: Any = None
  vocab_major: bool = flax.struct.field(pytree_node=False, default=True)
  dtype: Any = flax.struct.field(pytree_node=False, default=jnp.float32)
  softcap: float | None = flax.struct.field(pytree_node=False, default=None)
  scale: float | None = flax.struct.field(pytree_node=False, default=None)

  def logits(self):
    return head_logits(qmatmul(self.h, self.arrays, self.spec, self.dtype), self.bias,
                       self.scale, self.softcap)

  @property
  def w(self):
    w_DV = dequantize(self.arrays, self.spec)
    return w_DV.T if self.vocab_major else w_DV


class _Quantized(nnx.Module):
  """The stored arrays of one weight (qweight, scales, zeros) and its QuantSpec."""

  def _set_arrays(self, arrays: dict, spec: QuantSpec, dtype):
    p = _params(arrays, spec.mode)
    self.qweight = p["qweight"]
    self.scales = p.get("scales")
    self.zeros = p.get("zeros")
    self.spec, self.dtype = spec, dtype

  def arrays(self) -> dict:
    return {k: v[...] for k in ("qweight", "scales", "zeros")
            if (v := getattr(self, k)) is not None}


class QuantDense(_Quantized):
  """A Dense whose kernel [in, out] is stored quantized; the bias stays float."""

  def __init__(self, arrays: dict, spec: QuantSpec, *, bias: nnx.Param | None = None,
               dtype=jnp.float32):
    self._set_arrays(arrays, spec, dtype)
    self.bias = bias

  @classmethod
  def from_dense(cls, dense: Dense, spec: QuantSpec) -> QuantDense:
    return cls(quantize_weight(dense.kernel[...], spec), spec, bias=dense.bias,
               dtype=dense.dtype)

  def __call__(self, x):
    y = qmatmul(x, self.arrays(), self.spec, self.dtype)
    return y if self.bias is None else y + self.bias[...].astype(jnp.float32)

  def projection(self, h) -> QuantProjection:
    """What Projection.of_dense gives for a Dense: logits = h @ kernel (+ bias)."""
    bias = None if self.bias is None else self.bias[...]
    return QuantProjection(h, self.arrays(), self.spec, bias, vocab_major=False,
                           dtype=self.dtype)


class QuantEmbed(_Quantized):
  """An Embed whose table E [V, D] is stored as the weight E^T [D in, V out], so the
  same arrays serve the tied head (h @ E^T, scales per vocabulary row) and the lookup
  (one column per token)."""

  def __init__(self, arrays: dict, spec: QuantSpec, *, dtype=jnp.float32,
               scale: float | None = None):
    self._set_arrays(arrays, spec, dtype)
    self.scale = scale  # Embed's (Gemma: sqrt(D))

  @classmethod
  def from_embed(cls, embed: Embed, spec: QuantSpec) -> QuantEmbed:
    return cls(quantize_weight(embed.embedding[...].T, spec), spec, dtype=embed.dtype,
               scale=embed.scale)

  def __call__(self, ids):
    return scaled(gather_columns(self.arrays(), self.spec, ids), self.scale, self.dtype)

  def projection(self, x_BTD) -> QuantProjection:
    return QuantProjection(x_BTD, self.arrays(), self.spec, vocab_major=True, dtype=self.dtype)

  def attend(self, x_BTD):
    return self.projection(x_BTD).logits()


# ---- the swap ---------------------------------------------------------------------------
def quantization_of(model: nnx.Module) -> QuantConfig | None:
  """The QuantConfig `quantize` applied to `model`, or None for a float model."""
  return getattr(model, "quantization", None)


def _is_tied_table(model: nnx.Module, embed: Embed) -> bool:
  cfg = getattr(model, "config", None)
  return bool(cfg is not None and cfg.tie_word_embeddings
              and embed.embedding.get_value().shape[0] == cfg.vocab_size)


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
  parent = model
  for k in path[:-1]:
    parent = parent[k] if isinstance(k, int) else getattr(parent, k)
  if isinstance(path[-1], int):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


def quantize(model: nnx.Module, mode: str, group_size: int = 128, *, symmetric: bool = False,
             embeddings: bool = True, block_size: int = BLOCK_SIZE) -> nnx.Module:
  """Weight-only quantization of `model`, in place; returns it.

  Args:
    mode: "int8" (symmetric, per output channel), "int4" (per group of `group_size`
      input features, two codes a byte; with a zero point per group unless `symmetric`)
      or "bf16".
    embeddings: also quantize embedding tables that are not the LM head (position,
      token type, an untied token table). A tied token table is the head: it is always
      quantized, and its lookups read the same codes.
    block_size: output columns per block of the stored layout (module docstring).

  Every Dense anywhere in the model (blocks, heads, pooler) is swapped; MoE experts
  (stacked parameters, not Dense modules) stay float. Raises ConfigError, before
  changing anything, for an unknown mode, a group_size that does not divide some Dense's
  input features, or a model that is already quantized.
  """
  cfg = QuantConfig(mode, group_size, symmetric, embeddings, block_size)
  done = quantization_of(model)
  if done is not None or any(isinstance(m, _Quantized) for _, m in nnx.iter_modules(model)):
    raise ConfigError(f"quantize: the model is already quantized "
                      f"({done.mode if done else 'some layers'}); start from a float model")
  plan = []
  for path, m in nnx.iter_modules(model):
    if isinstance(m, Dense):
      K, N = m.kernel.get_value().shape
      plan.append((path, m, make_spec(cfg, K, N, path_name(path))))
    elif isinstance(m, Embed) and (embeddings or _is_tied_table(model, m)):
      V, D = m.embedding.get_value().shape
      plan.append((path, m, make_spec(cfg, D, V, path_name(path))))
  for path, m, spec in plan:
    new = (QuantDense.from_dense(m, spec) if isinstance(m, Dense)
           else QuantEmbed.from_embed(m, spec))
    _replace(model, path, new)
  model.quantization = cfg
  return model


def param_bytes(model: nnx.Module) -> dict[str, int]:
  """Bytes of the model's parameters by format: "int8", "int4" and "bfloat16" for the
  quantized weights' codes (an int4 byte holds two), otherwise the storage dtype (scales
  "float32", int4 zero points "uint8", ...). Works on abstract (eval_shape) models."""
  out: dict[str, int] = {}
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    v = var.get_value()
    label = var.get_metadata().get("quant") or str(np.dtype(v.dtype))
    label = "bfloat16" if label == "bf16" else label
    out[label] = out.get(label, 0) + int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
  return dict(sorted(out.items()))
