"""Helpers shared by the Hugging Face family modules: tensor name/layout mapping both ways,
RoPE config spellings, and the few config fields every family writes the same way.

A family describes its checkpoint as a `TensorMap`: 1:1 renames (optionally transposing a
torch Linear weight [out, in] into a jaxlm kernel [in, out]), fused tensors that split
into several jaxlm tensors (QKV layouts) and tied copies saved under a second name. The
same description drives import and export, so names map exactly both ways, and every
import error names the Hugging Face tensor.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np

from jaxlm.config import LAYER_TYPES, ModelConfig
from jaxlm.errors import ConfigError, DataError
from jaxlm.hf.family import Family, Tensors

SOURCE = "Hugging Face checkpoint"


# ---- tensor layouts --------------------------------------------------------------------
def linear_to_kernel(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> jaxlm kernel [in, out] (a view; no copy yet)."""
  return w.T


def kernel_to_linear(k: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(k.T)


@dataclasses.dataclass(frozen=True)
class Fused:
  """One HF tensor holding several jaxlm tensors (e.g. a fused QKV projection)."""

  hf: str
  jax: tuple[str, ...]
  split: Callable[[np.ndarray], Sequence[np.ndarray]]  # HF tensor -> jaxlm tensors
  fuse: Callable[[Sequence[np.ndarray]], np.ndarray]  # inverse of split


@dataclasses.dataclass(frozen=True)
class Stacked:
  """Several HF tensors that jaxlm stores as one (per-expert MoE weights -> [E, ...])."""

  hf: tuple[str, ...]
  jax: str
  stack: Callable[[Sequence[np.ndarray]], np.ndarray]  # HF tensors -> jaxlm tensor
  unstack: Callable[[np.ndarray], Sequence[np.ndarray]]  # inverse of stack


@dataclasses.dataclass(frozen=True)
class Rename:
  hf: str
  jax: str
  transpose: bool = False  # torch Linear weight <-> jaxlm kernel
  optional: bool = False  # absent on import: left out, and the model initializes it


@dataclasses.dataclass(frozen=True)
class Duplicate:
  """A tied parameter that HF files may hold twice: `copy` is a second name for `of`."""

  copy: str
  of: str
  write: bool  # export writes the copy too


class TensorMap:
  """The full name/layout correspondence of one model; built per config.

  On import, each incoming name is first brought to the form the rules are matched in:
  the `legacy` regex substitutions ((pattern, replacement), e.g. TF-era
  `LayerNorm.gamma` -> `LayerNorm.weight`) are applied, then `base_prefix` is dropped where
  present, on incoming and rule names alike. HF checkpoints saved from the base model omit
  that prefix ("h.0..." vs "transformer.h.0...") and head models add it; transformers
  accepts both, so do we. `ignore` regexes are searched in the matched form of each tensor
  that no rule used: non-parameter buffers, tied duplicates, other models' heads.
  """

  def __init__(self, base_prefix: str = "", ignore: Sequence[str] = (),
               legacy: Sequence[tuple[str, str]] = ()):
    self.rules: list[Rename | Fused | Stacked] = []
    self.duplicates: list[Duplicate] = []
    self.base_prefix = base_prefix
    self.ignore = [re.compile(p) for p in ignore]
    self.legacy = [(re.compile(p), repl) for p, repl in legacy]

  def rename(self, hf: str, jax: str, *, transpose: bool = False,
             optional: bool = False) -> TensorMap:
    self.rules.append(Rename(hf, jax, transpose, optional))
    return self

  def linear(self, hf_prefix: str, jax_prefix: str, *, bias: bool,
             optional: bool = False) -> TensorMap:
    """A torch Linear (weight [out, in] + optional bias) <-> a jaxlm Dense. `optional`:
    a checkpoint may lack it (a BertModel saved without its pooler)."""
    self.rename(f"{hf_prefix}.weight", f"{jax_prefix}.kernel", transpose=True,
                optional=optional)
    if bias:
      self.rename(f"{hf_prefix}.bias", f"{jax_prefix}.bias", optional=optional)
    return self

  def norm(self, hf_prefix: str, jax_prefix: str, *, bias: bool) -> TensorMap:
    self.rename(f"{hf_prefix}.weight", f"{jax_prefix}.scale")
    if bias:
      self.rename(f"{hf_prefix}.bias", f"{jax_prefix}.bias")
    return self

  def lm_head(self, hf_prefix: str, *, tied: bool) -> TensorMap:
    """Untied: a bias-free Linear. Tied: the head is the token embedding, and a duplicate
    copy that some checkpoints still carry is ignored (transformers re-ties it too)."""
    if tied:
      self.ignore.append(re.compile(rf"^{re.escape(hf_prefix)}\.weight$"))
    else:
      self.linear(hf_prefix, "lm_head", bias=False)
    return self

  def duplicate(self, copy: str, of: str, *, write: bool) -> TensorMap:
    """`copy` names the same tensor as the HF tensor `of` (a tied parameter that
    transformers saves under both names). Import reads `of`, or `copy` when only that is
    present; export writes the copy as well when `write`."""
    self.duplicates.append(Duplicate(copy, of, write))
    return self

  def fused(self, hf: str, jax: Sequence[str], split, fuse) -> TensorMap:
    self.rules.append(Fused(hf, tuple(jax), split, fuse))
    return self

  def fused_linear(self, hf_prefix: str, jax_prefixes: Sequence[str], split, fuse, *,
                   bias: bool) -> TensorMap:
    """A torch Linear whose output rows hold several jaxlm Denses (a fused QKV): its
    weight and bias each split with `split` (and fuse back with `fuse`), which take and
    give weights in torch's [out, in] rows and jaxlm kernels [in, out] (qkv_split_*)."""
    for part, jp in (("weight", "kernel"), ("bias", "bias"))[:2 if bias else 1]:
      self.fused(f"{hf_prefix}.{part}", [f"{j}.{jp}" for j in jax_prefixes], split, fuse)
    return self

  def stacked_linear(self, hf_prefix: str, jax_prefixes: Sequence[str], sizes: Sequence[int]
                     ) -> TensorMap:
    """A bias-free torch Linear whose output rows stack several jaxlm Denses ([q | k | v],
    Phi-3's [gate | up]): weight [sum(sizes), in] <-> kernels [in, size] each."""
    sizes = tuple(sizes)
    return self.fused_linear(hf_prefix, jax_prefixes,
                             lambda w: qkv_split_blocks(w, sizes, transpose=True),
                             lambda parts: qkv_fuse_blocks(parts, transpose=True), bias=False)

  def stacked(self, hf: Sequence[str], jax: str, stack, unstack) -> TensorMap:
    self.rules.append(Stacked(tuple(hf), jax, stack, unstack))
    return self

  # ---- import ---------------------------------------------------------------------------
  def _key(self, name: str) -> str:
    """The form a name is matched in: without the base-model prefix."""
    return name.removeprefix(self.base_prefix) if self.base_prefix else name

  def _found(self, tensors: Tensors) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Incoming tensors by matched form -> [(name in the checkpoint, tensor)]; more than
    one only in a file that spells a name two ways."""
    found: dict[str, list[tuple[str, np.ndarray]]] = {}
    for name, value in tensors.items():
      key = name
      for pattern, repl in self.legacy:
        key = pattern.sub(repl, key)
      found.setdefault(self._key(key), []).append((name, value))
    return found

  def from_hf(self, tensors: Tensors, expected: dict[str, tuple], arch: str) -> Tensors:
    """HF tensors -> jaxlm tensors. Missing, unexpected and misshapen tensors raise
    DataError naming the HF tensor; `expected` holds the jaxlm shapes."""
    found = self._found(tensors)
    used = set()
    for dup in self.duplicates:
      copy = self._key(dup.copy)
      if copy in found:  # the same tensor: read under the main name unless that is present
        found.setdefault(self._key(dup.of), found[copy])
        used.add(copy)

    def get(hf: str) -> tuple[str, np.ndarray]:
      key = self._key(hf)
      if key not in found:
        raise DataError(f"{SOURCE}: missing tensor {hf!r} (needed by {arch})")
      if len(found[key]) > 1:
        raise DataError(f"{SOURCE}: tensors {found[key][0][0]!r} and {found[key][1][0]!r} "
                        f"are two spellings of {hf!r}; keep one")
      used.add(key)
      return found[key][0]

    out: Tensors = {}
    for rule in self.rules:
      if isinstance(rule, Stacked):
        out[rule.jax] = _from_stacked(rule, [get(k) for k in rule.hf], expected, arch)
        continue
      if isinstance(rule, Rename) and rule.optional and self._key(rule.hf) not in found:
        continue  # from_pretrained initializes it and names it in a warning
      name, value = get(rule.hf)
      if isinstance(rule, Rename):
        want = expected.get(rule.jax)
        hf_want = want[::-1] if rule.transpose and want is not None else want
        if tuple(value.shape) != hf_want:
          raise DataError(f"{SOURCE}: tensor {name!r} has shape {tuple(value.shape)}, expected "
                          f"{hf_want} by the config ({arch}: {rule.jax} {want})")
        out[rule.jax] = linear_to_kernel(value) if rule.transpose else value
        continue
      try:
        parts = dict(zip(rule.jax, rule.split(value), strict=True))
      except ValueError:
        parts = None
      if parts is None or any(tuple(v.shape) != expected.get(k) for k, v in parts.items()):
        raise DataError(f"{SOURCE}: tensor {name!r} has shape {tuple(value.shape)}, which "
                        f"does not match the config ({arch}: "
                        + ", ".join(f"{k} {expected.get(k)}" for k in rule.jax) + ")")
      out.update(parts)
    extra = sorted(name for key, spellings in found.items() for name, _ in spellings
                   if key not in used and not any(p.search(key) for p in self.ignore))
    if extra:
      raise DataError(f"{SOURCE}: unexpected tensor {extra[0]!r} for {arch} with this config"
                      + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return out

  # ---- export ---------------------------------------------------------------------------
  def to_hf(self, params: Tensors) -> Tensors:
    out: Tensors = {}
    for rule in self.rules:
      if isinstance(rule, Rename):
        v = params[rule.jax]
        out[rule.hf] = kernel_to_linear(v) if rule.transpose else np.ascontiguousarray(v)
      elif isinstance(rule, Stacked):
        out.update(zip(rule.hf, map(np.ascontiguousarray, rule.unstack(params[rule.jax])),
                       strict=True))
      else:
        out[rule.hf] = np.ascontiguousarray(rule.fuse([params[k] for k in rule.jax]))
    out.update({dup.copy: out[dup.of] for dup in self.duplicates if dup.write})
    missing = set(params) - {n for r in self.rules for n in _names(r)}
    if missing:  # a jaxlm parameter the HF format has no place for: a mapping bug
      raise DataError(f"save_pretrained: no Hugging Face name for {sorted(missing)[0]!r}")
    return out


def _names(rule: Rename | Fused | Stacked) -> tuple[str, ...]:
  return (rule.jax,) if isinstance(rule.jax, str) else rule.jax


def _from_stacked(rule: Stacked, found: Sequence[tuple[str, np.ndarray]], expected: dict,
                  arch: str) -> np.ndarray:
  """`found`: (name in the checkpoint, tensor) for each of `rule.hf`."""
  names, parts = [k for k, _ in found], [p for _, p in found]
  want = expected.get(rule.jax)
  for k, p in zip(names, parts):
    if p.shape != parts[0].shape or want is None or len(want) != p.ndim + 1:
      raise DataError(f"{SOURCE}: tensor {k!r} has shape {tuple(p.shape)}, which does not "
                      f"match the config ({arch}: {rule.jax} {want})")
  value = rule.stack(parts)
  if tuple(value.shape) != want:
    raise DataError(f"{SOURCE}: tensor {names[0]!r} has shape {tuple(parts[0].shape)}, which "
                    f"does not match the config ({arch}: {rule.jax} {want}, "
                    f"{len(rule.hf)} stacked)")
  return value


def map_family(name: str, architectures: Sequence[str],
               config_from_hf: Callable[[dict], ModelConfig],
               config_to_hf: Callable[[ModelConfig, str], dict],
               tensor_map: Callable[..., TensorMap], *, per_class: bool = False) -> Family:
  """A family whose tensors are fully described by `tensor_map(cfg)`, or by
  `tensor_map(cfg, arch)` with `per_class` when its HF classes hold different tensors
  (BERT's base model and heads)."""

  def the_map(cfg: ModelConfig, arch: str) -> TensorMap:
    return tensor_map(cfg, arch) if per_class else tensor_map(cfg)

  def params_from(tensors: Tensors, cfg: ModelConfig, arch: str, expected) -> Tensors:
    return the_map(cfg, arch).from_hf(tensors, expected, arch)

  def params_to(params: Tensors, cfg: ModelConfig, arch: str) -> Tensors:
    return the_map(cfg, arch).to_hf(params)

  return Family(name, tuple(architectures), config_from_hf, config_to_hf, params_from,
                params_to)


# ---- fused QKV layouts -----------------------------------------------------------------
def qkv_split_blocks(w: np.ndarray, sizes: Sequence[int], *, transpose: bool):
  """[q | k | v] stacked along the output axis (MPT Wqkv; GPT-2 Conv1D with transpose=False
  since its weight is already [in, out])."""
  axis = 0 if transpose else w.ndim - 1
  if w.shape[axis] != sum(sizes):
    raise ValueError("fused size mismatch")
  parts = np.split(w, np.cumsum(sizes)[:-1], axis=axis)
  return [p.T if transpose else p for p in parts]


def qkv_fuse_blocks(parts: Sequence[np.ndarray], *, transpose: bool) -> np.ndarray:
  if transpose:
    return np.concatenate([p.T for p in parts], axis=0)
  return np.concatenate(parts, axis=-1)


def qkv_split_grouped(w: np.ndarray, num_kv_heads: int, group: int, head_dim: int):
  """Per KV group, the group's G query heads, then its key and its value head: rows
  [K, G + 2, H] (Falcon's query_key_value). G = 1 is the per-head [q_h, k_h, v_h] of
  BLOOM, GPT-NeoX and Falcon's old multi-head layout; K = 1 is Falcon's multi-query
  [q_1 .. q_N, k, v]. A Linear weight [K*(G+2)*H, D] or its bias -> q [D, K*G*H] and
  k, v [D, K*H] as jaxlm kernels (or biases [K*G*H], [K*H]); query head k*G + g serves
  KV head k, as jaxlm's grouped attention reads it."""
  K, G, H = num_kv_heads, group, head_dim
  if w.shape[0] != K * (G + 2) * H:
    raise ValueError("fused size mismatch")
  rest = w.shape[1:]
  w_KGH_ = w.reshape(K, G + 2, H, *rest)
  parts = [w_KGH_[:, :G].reshape(K * G * H, *rest), w_KGH_[:, G].reshape(K * H, *rest),
           w_KGH_[:, G + 1].reshape(K * H, *rest)]
  return [p.T if p.ndim == 2 else p for p in parts]


def qkv_fuse_grouped(parts: Sequence[np.ndarray], num_kv_heads: int, group: int,
                     head_dim: int) -> np.ndarray:
  K, G, H = num_kv_heads, group, head_dim
  q, k, v = [p.T if p.ndim == 2 else p for p in parts]  # back to rows [out, (D)]
  rest = q.shape[1:]
  w_KGH_ = np.concatenate([q.reshape(K, G, H, *rest), k.reshape(K, 1, H, *rest),
                           v.reshape(K, 1, H, *rest)], axis=1)
  return w_KGH_.reshape(K * (G + 2) * H, *rest)


def qkv_split_interleaved(w: np.ndarray, num_heads: int, head_dim: int):
  """Per-head [q_h, k_h, v_h] rows (BLOOM, GPT-NeoX query_key_value): a Linear weight
  [N*3*H, D] or its bias [N*3*H] -> q, k, v as jaxlm kernels [D, N*H] / biases [N*H]."""
  return qkv_split_grouped(w, num_heads, 1, head_dim)


def qkv_fuse_interleaved(parts: Sequence[np.ndarray], num_heads: int, head_dim: int):
  return qkv_fuse_grouped(parts, num_heads, 1, head_dim)


# ---- config helpers --------------------------------------------------------------------
def require(hf: dict, key: str, ok: Callable[[object], bool], default, why: str) -> None:
  """Rejects an HF option jaxlm does not implement, naming the config key."""
  value = hf.get(key, default)
  if not ok(value):
    raise ConfigError(f"config.json: {key}={value!r} is not supported ({why})")


def rope_from_hf(hf: dict, *, default_theta: float = 10000.0, default_partial: float = 1.0,
                 longrope: bool = False) -> dict:
  """ModelConfig RoPE fields from either spelling: transformers 5 `rope_parameters`, or
  the legacy `rope_theta` + `rope_scaling` (`rotary_emb_base` + `rotary_pct` for NeoX).
  `longrope`: the family takes longrope scaling; only Phi-3 does, since its generate
  recomputes the cache at the switch as jaxlm.generate does, where transformers' other
  classes keep keys rotated the short way."""
  params = dict(hf.get("rope_parameters") or {})
  theta = params.get("rope_theta",
                     hf.get("rope_theta", hf.get("rotary_emb_base", default_theta)))
  partial = params.get("partial_rotary_factor",
                       hf.get("partial_rotary_factor", hf.get("rotary_pct", default_partial)))
  source = params or dict(hf.get("rope_scaling") or {})  # the scaling spec, either spelling
  kind = source.get("rope_type", source.get("type")) or "default"

  def field(key, default=None):
    if key in source:
      return source[key]
    if default is None:
      raise ConfigError(f"config.json: rope scaling {kind!r} needs {key!r}")
    return default

  scaling = None
  if kind == "linear":
    scaling = {"rope_type": "linear", "factor": float(field("factor"))}
  elif kind == "llama3":
    scaling = {"rope_type": "llama3", "factor": float(field("factor")),
               "low_freq_factor": float(field("low_freq_factor")),
               "high_freq_factor": float(field("high_freq_factor")),
               # transformers defaults it to max_position_embeddings
               "original_max_position_embeddings": int(field(
                   "original_max_position_embeddings", hf.get("max_position_embeddings")))}
  elif kind in ("longrope", "su") and longrope:  # "su": what early Phi-3 configs said
    scaling = _longrope_from_hf(hf, source, field)
  elif kind != "default":
    raise ConfigError(f"config.json: rope type {kind!r} is not supported (supported: "
                      f"default, linear, llama3{', longrope' if longrope else ''})")
  return dict(rope_theta=float(theta), partial_rotary_factor=float(partial), rope_scaling=scaling)


def layer_types_from_hf(hf: dict, layers: int, default: Sequence[str]) -> list[str]:
  """config.json's `layer_types` ("full_attention" / "sliding_attention" per layer), or
  `default` (the family's derivation) when absent."""
  types = hf.get("layer_types")
  if types is None:
    return list(default)
  if not isinstance(types, list) or len(types) != layers or not set(types) <= set(LAYER_TYPES):
    raise ConfigError(f"config.json: layer_types must list one of {LAYER_TYPES} for each of "
                      f"the {layers} layers, got {types!r}")
  return types


def _longrope_from_hf(hf: dict, source: dict, field) -> dict:
  """Phi-3's long-context RoPE. original_max_position_embeddings may sit at the top level
  (Hub configs) or in the scaling dict (transformers 5); `factor` and `attention_factor`
  are optional (see jaxlm.layers.position.longrope_attention_factor)."""
  out = {"rope_type": "longrope",
         "short_factor": [float(x) for x in field("short_factor")],
         "long_factor": [float(x) for x in field("long_factor")],
         "original_max_position_embeddings": int(field(
             "original_max_position_embeddings", hf.get("original_max_position_embeddings")))}
  for key in ("factor", "attention_factor"):
    if source.get(key) is not None:
      out[key] = float(source[key])
  return out


def rope_to_hf(cfg: ModelConfig, *, with_partial: bool, longrope: bool = False) -> dict:
  """transformers-5 `rope_parameters`; longrope only where the family takes it (see
  rope_from_hf)."""
  params = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
  if (cfg.rope_scaling or {}).get("rope_type") == "longrope" and not longrope:
    raise ConfigError(f"model.rope_scaling longrope cannot be saved as {cfg.model_type} "
                      "(only Phi-3's transformers class recomputes its cache at the switch)")
  if cfg.rope_scaling:
    params.update({k: v for k, v in cfg.rope_scaling.items() if k != "type"})
    params["rope_type"] = cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type"))
  if with_partial:
    params["partial_rotary_factor"] = cfg.partial_rotary_factor
  elif cfg.partial_rotary_factor != 1.0:
    raise ConfigError(f"model.partial_rotary_factor={cfg.partial_rotary_factor} cannot be "
                      f"expressed in a {cfg.model_type} Hugging Face config")
  return params


def special_tokens_from_hf(hf: dict) -> dict:
  return dict(pad_token_id=hf.get("pad_token_id"), bos_token_id=hf.get("bos_token_id"),
              eos_token_id=hf.get("eos_token_id"))


def labels_from_hf(hf: dict) -> dict:
  """num_labels, id2label, label2id as transformers reads them: num_labels is the size of
  id2label when there is one, else the `num_labels` key, else 2. transformers' default
  names (LABEL_0, ...) read as None, so configs round-trip equal."""
  id2label, label2id = hf.get("id2label") or None, hf.get("label2id") or None
  num = len(id2label) if id2label else hf.get("num_labels") or 2
  default = {str(i): f"LABEL_{i}" for i in range(num)}
  if id2label is not None and {str(k): v for k, v in id2label.items()} == default and (
      label2id is None or label2id == {v: int(k) for k, v in default.items()}):
    id2label = label2id = None  # transformers' default names: the same as none given
  return dict(num_labels=num, id2label=id2label, label2id=label2id)


def labels_to_hf(cfg: ModelConfig) -> dict:
  """The label keys transformers writes: none for its default two labels (LABEL_0, LABEL_1),
  else id2label (string keys, as JSON has them) and label2id; num_labels follows from
  id2label. A label2id the config lacks is left out unless the names are the defaults."""
  default = {i: f"LABEL_{i}" for i in range(cfg.num_labels)}
  id2label = cfg.id2label or default
  label2id = cfg.label2id
  if label2id is None and cfg.id2label is None:
    label2id = {v: k for k, v in default.items()}
  if cfg.num_labels == 2 and id2label == default and label2id in (None, {"LABEL_0": 0,
                                                                            "LABEL_1": 1}):
    return {}
  out = {"id2label": {str(k): v for k, v in sorted(id2label.items())}}
  if label2id is not None:
    out["label2id"] = dict(label2id)
  return out


# ModelConfig options that only some Hugging Face classes have, at their "off" values.
# An export refuses any other value, naming the field, unless the family lists it in
# `features`; save_pretrained then writes a jaxlm export instead of dropping it.
OPTIONAL_FIELDS = dict(sandwich_norm=False, norm_scale_offset=0.0, scale_embeddings=False,
                       layer_types=None, query_pre_attn_scalar=None,
                       attn_logit_softcapping=None, final_logit_softcapping=None,
                       qk_norm=None, rope_local_base_freq=None, parallel_shared_norm=False,
                       logit_scale=None, rope_interleaved=False, alibi_style="bloom",
                       clip_qkv=None)


def check_optional_fields(cfg: ModelConfig, arch: str, features=()) -> None:
  for name, off in OPTIONAL_FIELDS.items():
    if name not in features and getattr(cfg, name) != off:
      raise ConfigError(f"model.{name}={getattr(cfg, name)!r} cannot be saved as {arch} "
                        "(the Hugging Face class has no such option)")


def common_to_hf(cfg: ModelConfig, arch: str, model_type: str, *, moe: bool = False,
                 features=()) -> dict:
  """The keys every family's config.json carries. A model with MoE layers is refused
  unless the family has them (`moe`), as is any OPTIONAL_FIELDS option the family does not
  list in `features`, so save_pretrained falls back to a jaxlm export."""
  if cfg.num_local_experts and not moe:
    raise ConfigError(f"model.num_local_experts={cfg.num_local_experts} cannot be saved as "
                      f"{arch} (the Hugging Face class has no mixture of experts)")
  check_optional_fields(cfg, arch, features)
  return {
      "architectures": [arch],
      "model_type": model_type,
      "vocab_size": cfg.vocab_size,
      "initializer_range": cfg.initializer_range,
      "pad_token_id": cfg.pad_token_id,
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": cfg.eos_token_id,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "dtype": cfg.param_dtype,
  }


def expect(cfg: ModelConfig, family: str, **fields) -> None:
  """On export: the config must use exactly what the HF family hard-codes."""
  for name, want in fields.items():
    got = getattr(cfg, name)
    if got != want:
      raise ConfigError(f"model.{name}={got!r} cannot be saved as {family} "
                        f"(the Hugging Face class fixes it to {want!r})")
