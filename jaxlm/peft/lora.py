"""LoRA (Hu et al., 2021) by module swap, on Flax NNX's own `nnx.LoRA` and `nnx.LoRAParam`.

`apply_lora` replaces each targeted `Dense` inside the transformer blocks with a
`LoRADense` holding that Dense (`base`, untouched) and an `nnx.LoRA` (A [in, r], B [r, out],
both `nnx.LoRAParam`; A he-uniform, B zero, so the model's output is unchanged until B
trains):

    y = base(x) + (alpha / rank) * (dropout(x) @ A) @ B

No layer takes a LoRA argument: the swap is the whole mechanism, as quantization's is.
Because `LoRAParam` subclasses `nnx.Param`, the usual `nnx.split(model, nnx.Param)` still
sees every parameter; `trainable_filter` selects the LoRA parameters (plus any heads) so a
train step differentiates, and an optimizer keeps state for, those alone.

Targets name a block's Dense by its last path components: "q", "k", "v", "o" (attention,
self and cross), "up", "down", "gate" (MLP), or longer suffixes such as "cross_attn.q".
"all-linear" (or "all_linear") is every one of those seven, "mlp" the three MLP ones.
Denses outside the blocks (LM/MLM heads, the pooler) are never targets, and neither are
MoE experts, whose weights are stacked [E, ...] parameters rather than Denses (a MoE
layer's `router` is a Dense, reachable by naming it, but not part of "all-linear").
jaxlm keeps q, k and v as separate Denses in every family (the fused QKV layouts of MPT,
GPT-NeoX and BLOOM exist only in their Hugging Face mappings), so "q" never touches k.

Numerics: A and B are float32 (as PEFT upcasts adapters), and their matmuls run like the
base Dense's: operands in its compute dtype, float32 accumulation (`linear.matmul`).
`nnx.LoRA.__call__` is not used because it accumulates in the compute dtype; the scale
alpha/rank (which `nnx.LoRA` lacks) is applied by `LoRADense`, not folded into B, so the
learning rate means the same at any rank.

Dropout on the LoRA input path is an `nnx.Dropout`, off (deterministic) by default. A
Dense is called without the model's `rngs`, so training turns it on with
`lora_dropout(model, rngs)`: an `nnx.view` whose LoRA dropouts draw from `rngs`.

A train step differentiates the trainable split only:

    graphdef, trained, frozen = nnx.split(model, trainable_filter(heads), ...)
    def loss(trained):  # under jax.grad; the optimizer is initialized on `trained`
      net = lora_dropout(nnx.merge(graphdef, trained, frozen, copy=True), rngs)
      ...
Without copy=True, nnx.remat inside the blocks fails on the frozen Variables, which come
from an outer trace level (google/flax#5050).

Adapters are saved as `adapter_model.safetensors` plus a PEFT-style `adapter_config.json`
(see `save_adapters` for the tensor names and layout).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from jaxlm.errors import ConfigError, DataError
from jaxlm.hf.io import load_safetensors
from jaxlm.layers.linear import Dense, matmul
from jaxlm.models.block import TransformerBlock
from jaxlm.params import path_name

CONFIG_KEY = "finetune.lora"  # where the experiment config keeps LoRAConfig's keys
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

ATTENTION_NAMES = ("q", "k", "v", "o")
MLP_NAMES = ("up", "down", "gate")
ALIASES = {"all-linear": ATTENTION_NAMES + MLP_NAMES, "all_linear": ATTENTION_NAMES + MLP_NAMES,
           "mlp": MLP_NAMES}
_ORDER = ATTENTION_NAMES + ("gate", "up", "down")  # how error messages list module names


# ---- config -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """What to adapt and how. `modules_to_save` (PEFT's name) lists head modules by dotted
  path ("nsp.classifier", "score") that train in full and are saved with the adapters."""

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ("q", "v")
  modules_to_save: tuple[str, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "targets", _names_tuple(self.targets, "targets"))
    object.__setattr__(self, "modules_to_save",
                       _names_tuple(self.modules_to_save, "modules_to_save"))
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
      raise ConfigError(f"{CONFIG_KEY}.rank must be a positive integer, got {self.rank!r}")
    if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
        or not math.isfinite(self.alpha) or self.alpha <= 0):
      raise ConfigError(f"{CONFIG_KEY}.alpha must be a positive number, got {self.alpha!r}")
    if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
        or not 0.0 <= self.dropout < 1.0):
      raise ConfigError(f"{CONFIG_KEY}.dropout must be in [0, 1), got {self.dropout!r}")
    if not self.targets:
      raise ConfigError(f"{CONFIG_KEY}.targets is empty; name modules such as ('q', 'v') "
                        "or 'all-linear'")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_dict(cls, d: Any) -> LoRAConfig:
    """From an experiment-config section (a dict or ConfigDict); unknown keys are errors."""
    d = dict(d)
    known = [f.name for f in dataclasses.fields(cls)]
    extra = sorted(set(d) - set(known))
    if extra:
      raise ConfigError(f"{CONFIG_KEY}.{extra[0]}: unknown key; known: {', '.join(known)}")
    return cls(**d)

  def to_peft(self, *, task_type: str | None = None,
              base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json: PEFT's LoraConfig field names where they apply."""
    alias = len(self.targets) == 1 and self.targets[0] in ALIASES  # PEFT writes "all-linear"
    targets = self.targets[0] if alias else list(self.targets)
    return {
        "peft_type": "LORA", "r": self.rank, "lora_alpha": self.alpha,
        "lora_dropout": self.dropout, "target_modules": targets, "bias": "none",
        "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        # jaxlm kernels are [in, out], the layout PEFT calls fan_in_fan_out (GPT-2 Conv1D).
        "fan_in_fan_out": True, "inference_mode": True,
        "modules_to_save": list(self.modules_to_save) or None,
        "jaxlm_layout": "lora_a [in, r], lora_b [r, out], named by jaxlm parameter path",
    }

  @classmethod
  def from_peft(cls, d: dict, source: str) -> LoRAConfig:
    """The config an adapter_config.json describes; a bad one is a DataError naming it."""
    if not isinstance(d, dict) or d.get("peft_type") != "LORA":
      raise DataError(f"{source}: not a LoRA adapter config (peft_type must be 'LORA')")
    for key in ("r", "lora_alpha", "target_modules"):
      if key not in d:
        raise DataError(f"{source}: missing field {key!r}")
    if d.get("bias", "none") != "none":
      raise DataError(f"{source}: bias={d['bias']!r} is not supported (only 'none')")
    try:
      return cls(rank=d["r"], alpha=d["lora_alpha"], dropout=d.get("lora_dropout") or 0.0,
                 targets=d["target_modules"], modules_to_save=d.get("modules_to_save") or ())
    except ConfigError as e:
      raise DataError(f"{source}: {e}") from None


def _names_tuple(value, key: str) -> tuple[str, ...]:
  names = (value,) if isinstance(value, str) else tuple(value or ())
  for n in names:
    if not isinstance(n, str) or not n or any(not part for part in n.split(".")):
      raise ConfigError(f"{CONFIG_KEY}.{key}: {n!r} is not a module name")
  return names


# ---- the module -------------------------------------------------------------------------
class LoRADense(nnx.Module):
  """A Dense plus a low-rank update: base(x) + scale * (dropout(x) @ A) @ B."""

  def __init__(self, base: Dense, *, rank: int, alpha: float, dropout: float = 0.0,
               rngs: nnx.Rngs):
    in_features, out_features = base.kernel.get_value().shape
    axes = base.kernel.get_metadata().get("axes") or (None, None)
    self.base = base
    # Sharding: A's input dim and B's output dim follow the kernel's; the rank replicates.
    self.lora = nnx.LoRA(in_features, rank, out_features, dtype=base.dtype,
                         param_dtype=jnp.float32, rngs=rngs,
                         a_metadata={"axes": (axes[0], None)},
                         b_metadata={"axes": (None, axes[1])})
    self.rank, self.alpha = rank, float(alpha)
    self.lora_dropout = nnx.Dropout(dropout, deterministic=True) if dropout > 0 else None

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def delta(self) -> jax.Array:
    """scale * A @ B [in, out] in float32: what merging adds to the base kernel."""
    ab = jnp.matmul(self.lora.lora_a[...], self.lora.lora_b[...],
                    precision=jax.lax.Precision.HIGHEST)
    return self.scale * ab

  def __call__(self, x):
    y = self.base(x)
    h = x if self.lora_dropout is None else self.lora_dropout(x)
    dtype = self.base.dtype
    z = matmul(matmul(h, self.lora.lora_a[...], dtype), self.lora.lora_b[...], dtype)
    return y + self.scale * z


# ---- finding and swapping modules ---------------------------------------------------------
def _block_denses(model: nnx.Module) -> list[tuple[tuple, str, Dense]]:
  """(path, name inside its block, Dense) for every Dense inside a TransformerBlock."""
  modules = dict(nnx.iter_modules(model))
  out = []
  for path, m in modules.items():
    if not isinstance(m, Dense):
      continue
    for cut in range(len(path) - 1, 0, -1):
      if isinstance(modules.get(path[:cut]), TransformerBlock):
        out.append((path, path_name(path[cut:]), m))
        break
  return out


def _matches(local: str, target: str) -> bool:
  parts, want = local.split("."), target.split(".")
  return parts[-len(want):] == want


def _listing(locals_: Iterable[str]) -> str:
  def key(name):
    last = name.split(".")[-1]
    return (name.split(".")[:-1], _ORDER.index(last) if last in _ORDER else len(_ORDER), last)
  return ", ".join(sorted(set(locals_), key=key)) or "(none)"


def select_targets(model: nnx.Module, cfg: LoRAConfig) -> list[tuple[tuple, Dense]]:
  """The (path, Dense) pairs `cfg.targets` names; a target that matches nothing is a
  ConfigError listing the linear modules the blocks have."""
  denses = _block_denses(model)
  chosen = {}
  for target in cfg.targets:
    names = ALIASES.get(target, (target,))
    hits = [(p, d) for p, local, d in denses if any(_matches(local, n) for n in names)]
    if not hits:
      moe = (" (MoE experts are stacked parameters, not Dense modules)" if target == "mlp"
             else "")
      raise ConfigError(f"{CONFIG_KEY}.targets: {target!r} matches no module{moe}; linear "
                        f"modules: {_listing(local for _, local, _ in denses)}")
    chosen.update({p: d for p, d in hits})
  return sorted(chosen.items(), key=lambda kv: path_name(kv[0]))


def _parent_and_key(model: nnx.Module, path: tuple):
  parent = model
  for k in path[:-1]:
    parent = parent[k] if isinstance(k, int) else getattr(parent, k)
  return parent, path[-1]


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
  parent, key = _parent_and_key(model, path)
  if isinstance(key, int):
    parent[key] = new
  else:
    setattr(parent, key, new)


def lora_modules(model: nnx.Module) -> list[tuple[tuple, LoRADense]]:
  """(path, LoRADense) for every adapted layer, in path order."""
  return [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, LoRADense)]


def _head_predicate(head_paths: Sequence[str]) -> Callable[[tuple, Any], bool]:
  heads = [tuple(h.split(".")) for h in head_paths]

  def under_head(path, _value) -> bool:
    names = tuple(str(k) for k in path)
    return any(names[i:i + len(h)] == h for h in heads for i in range(len(names) - len(h) + 1))
  return under_head


def _check_heads(model: nnx.Module, head_paths: Sequence[str], key: str) -> None:
  if not head_paths:
    return
  names = [path_name(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  for h in head_paths:
    pred = _head_predicate((h,))
    if not any(pred(tuple(n.split(".")), None) for n in names):
      top = sorted({n.split(".")[0] for n in names})
      raise ConfigError(f"{key}: {h!r} matches no parameter of the model; its top-level "
                        f"modules: {', '.join(top)}")


def apply_lora(model: nnx.Module, cfg: LoRAConfig, *, rngs_seed: int = 0) -> nnx.Module:
  """Swaps each targeted Dense for a LoRADense, in place; returns `model`. The output is
  unchanged (B starts at zero); A is drawn from `rngs_seed`."""
  if lora_modules(model):
    raise ConfigError(f"{CONFIG_KEY}: the model already has LoRA adapters; merge_lora(model) "
                      "first, or apply to a fresh model")
  plan = select_targets(model, cfg)
  _check_heads(model, cfg.modules_to_save, f"{CONFIG_KEY}.modules_to_save")
  rngs = nnx.Rngs(params=rngs_seed)
  for path, dense in plan:
    _replace(model, path, LoRADense(dense, rank=cfg.rank, alpha=cfg.alpha,
                                    dropout=cfg.dropout, rngs=rngs))
  return model


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Folds scale * A @ B into each base kernel and puts the plain Dense back, in place;
  returns `model`, whose parameter names are then the original ones (for export, HF
  saving, generation without the extra matmuls)."""
  for path, m in lora_modules(model):
    kernel = m.base.kernel
    merged = kernel.get_value().astype(jnp.float32) + m.delta()
    kernel.set_value(merged.astype(kernel.get_value().dtype))
    _replace(model, path, m.base)
  return model


def _strip_lora(model: nnx.Module) -> None:
  """Puts the base Denses back unmerged (undoes apply_lora)."""
  for path, m in lora_modules(model):
    _replace(model, path, m.base)


def lora_dropout(model: nnx.Module, rngs: nnx.Rngs | None) -> nnx.Module:
  """An nnx.view of `model` whose LoRA dropouts are on, drawing masks from `rngs`'s
  "dropout" stream (call it on the model a train step merges, with the step's rngs);
  `model` itself when `rngs` is None or the adapters have no dropout."""
  if rngs is None or not any(m.lora_dropout is not None for _, m in lora_modules(model)):
    return model
  view = nnx.view(model, only=_is_lora_dropout, deterministic=False)
  stream = rngs["dropout"]
  for _, m in lora_modules(view):
    if m.lora_dropout is not None:
      m.lora_dropout.rngs = stream  # shared: each call advances it, so masks differ
  return view


def _is_lora_dropout(path, node) -> bool:
  return isinstance(node, nnx.Dropout) and bool(path) and path[-1] == "lora_dropout"


# ---- what trains ------------------------------------------------------------------------
def trainable_filter(head_paths: Sequence[str] = (), *, model: nnx.Module | None = None):
  """An nnx filter for the trainable state: every nnx.LoRAParam, plus every Param under the
  modules `head_paths` names (dotted, e.g. "nsp.classifier", "score"), so that
  `nnx.split(model, trainable_filter(...), ...)` yields exactly what trains. With `model`,
  a head path that matches no parameter is a ConfigError."""
  head_paths = _names_tuple(head_paths, "modules_to_save")
  if model is not None:
    _check_heads(model, head_paths, f"{CONFIG_KEY}.modules_to_save")
  if not head_paths:
    return nnx.LoRAParam
  return nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, _head_predicate(head_paths)))


def count_params(model: nnx.Module, filter: Any = nnx.Param) -> int:
  """The number of array elements in the variables `filter` selects."""
  return int(sum(np.prod(v.get_value().shape, dtype=np.int64)
                 for _, v in nnx.to_flat_state(nnx.state(model, filter))))


# ---- saving and loading -----------------------------------------------------------------
def _adapter_tensors(model: nnx.Module, modules_to_save: Sequence[str]) -> dict[str, Any]:
  """name -> Variable for every LoRA parameter and head parameter that saving covers."""
  state = nnx.state(model, trainable_filter(modules_to_save))
  return {path_name(p): v for p, v in nnx.to_flat_state(state)}


def _task_type(model: nnx.Module) -> str | None:
  arch = ((getattr(getattr(model, "config", None), "architectures", None) or [""])[0])
  if arch.endswith("ForCausalLM"):
    return "CAUSAL_LM"
  if arch.endswith("ForConditionalGeneration"):
    return "SEQ_2_SEQ_LM"
  if arch.endswith("ForSequenceClassification"):
    return "SEQ_CLS"
  if arch.endswith("ForTokenClassification"):
    return "TOKEN_CLS"
  if arch.endswith("ForQuestionAnswering"):
    return "QUESTION_ANS"
  return None


def _check_overwrite(directory: str) -> None:
  """Refuses to replace files that are not a previous LoRA adapter."""
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise DataError(f"{directory}: exists and is not a directory")
  cfg_path = os.path.join(directory, ADAPTER_CONFIG)
  weights = os.path.join(directory, ADAPTER_WEIGHTS)
  if os.path.exists(cfg_path):
    try:
      with open(cfg_path, encoding="utf-8") as f:
        old = json.load(f)
    except (OSError, ValueError):
      old = None
    if not isinstance(old, dict) or old.get("peft_type") != "LORA":
      raise DataError(f"{cfg_path}: exists and is not a LoRA adapter config; refusing to "
                      "overwrite it (choose another directory)")
  elif os.path.exists(weights):
    raise DataError(f"{weights}: exists without an {ADAPTER_CONFIG} marking it a LoRA "
                    "adapter; refusing to overwrite it (choose another directory)")


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _to_numpy(value) -> np.ndarray:
  a = np.asarray(jax.device_get(value))
  # bf16/fp16 heads are saved as float32 (exact), which every safetensors reader takes.
  return a.astype(np.float32) if a.dtype.kind == "V" or a.dtype.itemsize < 4 else a


def save_adapters(model: nnx.Module, directory: str, cfg: LoRAConfig,
                  base_model_name_or_path: str | None = None, *,
                  task_type: str | None = None) -> str:
  """Writes the adapters (and `cfg.modules_to_save` heads) to `directory`; returns the
  weights path.

  adapter_model.safetensors holds each tensor under its jaxlm parameter name, in jaxlm's
  layout: "model.layers.0.attn.q.lora.lora_a" [in, r], "...lora.lora_b" [r, out], head
  parameters as `flat_params` names them (float32). These are jaxlm module paths, not
  PEFT's "base_model.model.<hf module>.lora_A.weight" [r, in]: the names are not loadable
  by PEFT, only the config's field names are shared. adapter_config.json carries PEFT's
  LoraConfig fields; `task_type` defaults to one inferred from the architecture. Each
  file is written to a temporary name and renamed; files of another kind already there
  are never overwritten.
  """
  mods = lora_modules(model)
  if not mods:
    raise ConfigError(f"{CONFIG_KEY}: the model has no LoRA adapters to save")
  for path, m in mods:
    if (m.rank, m.alpha) != (cfg.rank, float(cfg.alpha)):
      raise ConfigError(f"{CONFIG_KEY}: {path_name(path)} has rank {m.rank}, alpha {m.alpha}"
                        f", but the config says rank {cfg.rank}, alpha {cfg.alpha}")
  _check_heads(model, cfg.modules_to_save, f"{CONFIG_KEY}.modules_to_save")
  _check_overwrite(directory)
  os.makedirs(directory, exist_ok=True)
  tensors = {name: _to_numpy(v.get_value())
             for name, v in _adapter_tensors(model, cfg.modules_to_save).items()}
  weights = os.path.join(directory, ADAPTER_WEIGHTS)
  _atomic_write(weights, lambda p: save_file(tensors, p, metadata={"format": "jaxlm"}))
  peft = cfg.to_peft(task_type=task_type or _task_type(model),
                     base_model_name_or_path=base_model_name_or_path)

  def write_json(p):
    with open(p, "w", encoding="utf-8") as f:
      json.dump(peft, f, indent=2, sort_keys=True)
      f.write("\n")
  _atomic_write(os.path.join(directory, ADAPTER_CONFIG), write_json)
  return weights


def read_adapter_config(directory: str) -> LoRAConfig:
  """The LoRAConfig in `directory`/adapter_config.json (a DataError names a bad file)."""
  path = os.path.join(directory, ADAPTER_CONFIG)
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except FileNotFoundError:
    raise DataError(f"{path}: no such file (not a saved LoRA adapter directory)") from None
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: not readable JSON ({' '.join(str(e).split())})") from None
  return LoRAConfig.from_peft(d, path)


def load_adapters(model: nnx.Module, directory: str) -> nnx.Module:
  """Loads adapters saved by `save_adapters` into `model` (applying LoRA with the saved
  config when the model has none yet), in place; returns `model`. A missing, extra or
  misshapen tensor is a DataError naming the file and the tensor, and leaves the model
  as it was."""
  cfg = read_adapter_config(directory)
  weights = os.path.join(directory, ADAPTER_WEIGHTS)
  tensors = load_safetensors(weights)
  applied = not lora_modules(model)
  if applied:
    try:
      apply_lora(model, cfg)
    except ConfigError as e:  # the saved targets or heads do not fit this model
      raise DataError(f"{os.path.join(directory, ADAPTER_CONFIG)}: {e}") from None
  try:
    for path, m in lora_modules(model):
      if (m.rank, m.alpha) != (cfg.rank, float(cfg.alpha)):
        raise DataError(f"{weights}: adapters have rank {cfg.rank}, alpha {cfg.alpha}, but "
                        f"the model's {path_name(path)} has rank {m.rank}, alpha {m.alpha}")
    expected = _adapter_tensors(model, cfg.modules_to_save)
    for name, var in expected.items():
      if name not in tensors:
        raise DataError(f"{weights}: missing tensor {name!r}")
      got, want = tuple(tensors[name].shape), tuple(var.get_value().shape)
      if got != want:
        raise DataError(f"{weights}: tensor {name!r} has shape {got}, the model expects {want}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
      raise DataError(f"{weights}: unexpected tensor {extra[0]!r} (no such adapter or head "
                      f"parameter in the model; {len(extra) - 1} more)")
  except DataError:
    if applied:
      _strip_lora(model)
    raise
  for name, var in expected.items():
    var.set_value(jnp.asarray(tensors[name], dtype=var.get_value().dtype))
  return model
