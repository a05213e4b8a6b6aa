"""Weight pruning: `prune(model, method=..., sparsity=..., pattern=...)` zeroes weights of
the Dense kernels inside the transformer blocks, in place, and returns the model with a
`PruneReport` (the boolean masks and the sparsity each layer reached).

Which weights: the kernels of the attention projections q, k, v, o (self and cross) and
of the MLP's up, gate and down, i.e. every Dense a `TransformerBlock` holds under those
names (as `jaxlm.peft.lora` finds them). Embeddings, norms, biases, the LM head and other
heads (pooler, classifiers) stay dense: they are small, or (the tied head) shared with
the embedding, and pruning them hurts far more per weight. MoE expert stacks ([E, ...]
parameters, not Dense modules) and a MoE router are skipped too; the report lists the
block parameters that were left dense as `skipped`. Merge LoRA adapters first (a
LoRADense's base is not a target).

Methods (the score of weight W[i, o]: input i, output neuron o; kernels are [in, out]):
  magnitude  |W[i, o]|.
  wanda      |W[i, o]| * ||X_i||_2 (Sun et al. 2023, "A Simple and Effective Pruning
             Approach for LLMs"): X_i is input feature i of that Dense over every real
             token of a calibration set (~128 sequences). A weight on a feature with
             large activations matters more than its size says; no weight update, no
             second-order information. As in the paper's code, blocks are pruned in
             order and each block's activations are recorded with the blocks before it
             already pruned (`sequential=False`: every block from the dense model).

Patterns and scopes (the lowest-scoring weights of each comparison group are zeroed):
  unstructured  `sparsity` of the weights, compared per `scope`: "output" (within each
                output neuron's inputs: each column of the kernel loses exactly
                floor(sparsity * in) weights; Wanda's default), "layer" (within each
                kernel; magnitude's default) or "global" (across all targeted kernels;
                magnitude only).
  "N:M"         at most N non-zeros in every group of M consecutive INPUT weights of each
                output neuron (kernel rows 0-3, 4-7, ... of one column for "2:4", the
                layout sparse tensor cores accelerate); sparsity is then 1 - N/M.

Calibration inputs are captured without touching any layer: each target Dense is swapped
(as lora.py swaps in LoRADense) for a `_Recorder` that adds the squared inputs, weighted
by the batch's real-token mask, into a float32 variable, then calls the Dense. One
jitted forward per batch accumulates them; the Denses are put back afterwards.

Recovery fine-tuning with the masks fixed: jaxlm/compress/recover.py.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import tasks
from jaxlm.errors import ConfigError
from jaxlm.layers.linear import Dense
from jaxlm.models.block import TransformerBlock
from jaxlm.params import path_name
from jaxlm.peft.lora import ATTENTION_NAMES, MLP_NAMES, _block_denses, _replace

METHODS = ("magnitude", "wanda")
SCOPES = ("output", "layer", "global")
TARGET_NAMES = ATTENTION_NAMES + MLP_NAMES  # the last path component of a target Dense
_DEFAULT_SCOPE = {"magnitude": "layer", "wanda": "output"}
_NM = re.compile(r"(\d+):(\d+)")


# ---- the request -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PruneSpec:
  """A validated request. `sparsity` None means 0.5 (unstructured) or 1 - N/M (N:M);
  `scope` None means the method's default (module docstring)."""

  method: str = "magnitude"
  sparsity: float | None = None
  pattern: str = "unstructured"
  scope: str | None = None

  def __post_init__(self):
    if self.method not in METHODS:
      raise ConfigError(f"prune: method must be one of {METHODS}, got {self.method!r}")
    if not isinstance(self.pattern, str) or (
        self.pattern != "unstructured" and not _valid_nm(self.pattern)):
      raise ConfigError(f"prune: pattern must be 'unstructured' or 'N:M' with 0 < N < M "
                        f"(e.g. '2:4'), got {self.pattern!r}")
    s = self.sparsity
    if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float))
                          or not 0.0 <= s < 1.0):
      raise ConfigError(f"prune: sparsity must be a number in [0, 1), got {s!r}")
    nm = self.nm
    if nm is not None and s is not None and not math.isclose(s, 1 - nm[0] / nm[1]):
      raise ConfigError(f"prune: sparsity={s!r} contradicts pattern {self.pattern!r}, "
                        f"which fixes it at {1 - nm[0] / nm[1]:g} (leave sparsity unset)")
    if self.scope is not None:
      if nm is not None:
        raise ConfigError(f"prune: scope={self.scope!r} does not apply to pattern "
                          f"{self.pattern!r} (its groups are fixed; leave scope unset)")
      if self.scope not in SCOPES:
        raise ConfigError(f"prune: scope must be one of {SCOPES}, got {self.scope!r}")
      if self.scope == "global" and self.method == "wanda":
        raise ConfigError("prune: scope='global' is for magnitude; wanda compares weights "
                          "within each output neuron ('output') or layer ('layer')")

  @property
  def nm(self) -> tuple[int, int] | None:
    """(N, M) for an N:M pattern, else None."""
    m = _NM.fullmatch(self.pattern)
    return None if m is None else (int(m.group(1)), int(m.group(2)))

  @property
  def target(self) -> float:
    """The sparsity asked for."""
    nm = self.nm
    if nm is not None:
      return 1 - nm[0] / nm[1]
    return 0.5 if self.sparsity is None else float(self.sparsity)

  @property
  def group(self) -> str:
    """What weights compete: "output", "layer", "global" or "N:M"."""
    if self.nm is not None:
      return "N:M"
    return self.scope or _DEFAULT_SCOPE[self.method]


def _valid_nm(pattern: str) -> bool:
  m = _NM.fullmatch(pattern)
  return m is not None and 0 < int(m.group(1)) < int(m.group(2))


# ---- the result -----------------------------------------------------------------------
@dataclasses.dataclass
class PruneReport:
  """What `prune` did.

  masks: kernel parameter name ("model.layers.0.attn.q.kernel") -> bool [in, out],
    True where the weight is kept; what recovery fine-tuning holds fixed.
  layers: the same names -> the fraction of that kernel that is zero after pruning
    (measured on the weights, so it counts zeros that were there before too).
  skipped: block parameters left dense on purpose (MoE expert stacks, routers).
  calibration: {"sequences", "tokens"} the Wanda statistics came from (empty for
    magnitude).
  perplexity: for callers to fill ("before", "after", "recovered"); `to_dict` keeps it.
  """

  spec: PruneSpec
  masks: dict[str, jax.Array]
  layers: dict[str, float]
  skipped: list[str] = dataclasses.field(default_factory=list)
  calibration: dict[str, int] = dataclasses.field(default_factory=dict)
  perplexity: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def sparsity(self) -> float:
    """The zero fraction over all pruned kernels together (weighted by their sizes)."""
    sizes = {n: int(np.prod(m.shape)) for n, m in self.masks.items()}
    total = sum(sizes.values())
    return sum(self.layers[n] * sizes[n] for n in sizes) / max(total, 1)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready summary (no masks)."""
    return {"method": self.spec.method, "pattern": self.spec.pattern,
            "group": self.spec.group, "target_sparsity": self.spec.target,
            "sparsity": self.sparsity, "layers": dict(self.layers),
            "skipped": list(self.skipped), "calibration": dict(self.calibration),
            "perplexity": dict(self.perplexity)}


def layer_sparsity(model: nnx.Module, names: Iterable[str] | None = None) -> dict[str, float]:
  """kernel name -> fraction of exact zeros, for the prunable kernels (or `names`)."""
  kernels = {_kernel_name(p): d.kernel for p, d in prunable_denses(model)}
  if names is not None:
    kernels = {n: kernels[n] for n in names}
  return {n: float(jnp.mean(k.get_value() == 0)) for n, k in kernels.items()}


# ---- targets ----------------------------------------------------------------------------
def prunable_denses(model: nnx.Module) -> list[tuple[tuple, Dense]]:
  """(path, Dense) for every q, k, v, o, up, gate and down Dense inside a
  TransformerBlock, in the model's order (blocks first to last)."""
  return [(p, d) for p, _, d in _block_denses(model) if str(p[-1]) in TARGET_NAMES]


def _kernel_name(path: tuple) -> str:
  return path_name(path) + ".kernel"


def _block_of(model: nnx.Module, path: tuple) -> tuple:
  """The path of the TransformerBlock holding the module at `path`."""
  modules = dict(nnx.iter_modules(model))
  for cut in range(len(path) - 1, 0, -1):
    if isinstance(modules.get(path[:cut]), TransformerBlock):
      return path[:cut]
  return ()


def _skipped(model: nnx.Module, targets: list[tuple[tuple, Dense]]) -> list[str]:
  """Block parameters with 2+ dimensions that are not target kernels."""
  chosen = {_kernel_name(p) for p, _ in targets}
  blocks = {path_name(p) for p, m in nnx.iter_modules(model) if isinstance(m, TransformerBlock)}
  out = []
  for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name = path_name(p)
    if (v.get_value().ndim >= 2 and name not in chosen
        and any(name.startswith(b + ".") for b in blocks)):
      out.append(name)
  return out


# ---- masks from scores ----------------------------------------------------------------
def keep_mask(scores_IO: jax.Array, spec: PruneSpec, name: str = "kernel") -> jax.Array:
  """bool [in, out]: False for the lowest-scoring weights of each comparison group
  ("output", "layer" or N:M; "global" is `global_masks`). Exactly floor(sparsity * n)
  weights of a group of n are dropped (ties broken by position), so the counts are exact."""
  I, O = scores_IO.shape
  keep = jnp.ones((I, O), bool)
  nm = spec.nm
  if nm is not None:
    n, m = nm
    if I % m:
      raise ConfigError(f"prune: pattern {spec.pattern!r} needs input features divisible by "
                        f"{m}, but {name} has shape {(I, O)}")
    g_GMO = scores_IO.reshape(I // m, m, O)
    drop = jnp.argsort(g_GMO, axis=1)[:, :m - n, :]
    keep = jnp.put_along_axis(keep.reshape(I // m, m, O), drop, False, axis=1, inplace=False)
    return keep.reshape(I, O)
  if spec.group == "output":
    k = _count(spec.target, I)
    drop_kO = jnp.argsort(scores_IO, axis=0)[:k]
    return jnp.put_along_axis(keep, drop_kO, False, axis=0, inplace=False)
  if spec.group == "layer":
    k = _count(spec.target, I * O)
    drop = jnp.argsort(scores_IO.reshape(-1))[:k]
    return keep.reshape(-1).at[drop].set(False).reshape(I, O)
  raise ConfigError(f"prune: keep_mask cannot compare weights by {spec.group!r}")


def _count(sparsity: float, n: int) -> int:
  """floor(sparsity * n), immune to float error (0.29 * 100 is 28.999...)."""
  return math.floor(sparsity * n + 1e-9)


def global_masks(scores: dict[str, jax.Array], sparsity: float) -> dict[str, jax.Array]:
  """Masks dropping the floor(sparsity * total) lowest scores across all kernels."""
  flat = jnp.concatenate([s.reshape(-1) for s in scores.values()])
  k = _count(sparsity, flat.size)
  keep = jnp.ones(flat.shape, bool).at[jnp.argsort(flat)[:k]].set(False)
  out, start = {}, 0
  for name, s in scores.items():
    out[name] = keep[start:start + s.size].reshape(s.shape)
    start += s.size
  return out


def _apply_mask(dense: Dense, keep_IO: jax.Array) -> None:
  w = dense.kernel.get_value()
  dense.kernel.set_value(jnp.where(keep_IO, w, jnp.zeros((), w.dtype)))


# ---- calibration: per-input-feature activation norms ----------------------------------
class _SqSum(nnx.Variable):
  """Sum over real tokens of a Dense input's squares, per input feature (float32)."""


class _TokenWeights(nnx.Variable):
  """The batch's real-token mask [B, T], one Variable shared by every recorder."""


class _Recorder(nnx.Module):
  """A Dense that adds its inputs' weighted squares to `sq_sum`, then runs unchanged."""

  def __init__(self, dense: Dense, weights: _TokenWeights):
    self.dense = dense
    self.weights = weights
    self.sq_sum = _SqSum(jnp.zeros((dense.kernel.get_value().shape[0],), jnp.float32))

  def __call__(self, x):
    x2 = jnp.square(x.astype(jnp.float32))
    w = self.weights[...]
    if x2.shape[:-1] == w.shape:
      s_I = jnp.einsum("...i,...->i", x2, w)
    else:  # inputs not laid out like the batch (e.g. cross-attention keys): all rows
      s_I = x2.reshape(-1, x2.shape[-1]).sum(0)
    self.sq_sum[...] = self.sq_sum[...] + s_I
    return self.dense(x)


def token_weights(batch: dict, xp=np):
  """float32 [B, T]: 1 for real tokens (attention_mask, else segment_ids > 0, else all),
  times the batch's example_weight (0 for the rows padding a last batch). `xp`: np, or
  jnp inside a trace."""
  if "attention_mask" in batch:
    w = xp.asarray(batch["attention_mask"]).astype(xp.float32)
  elif "segment_ids" in batch:
    w = (xp.asarray(batch["segment_ids"]) > 0).astype(xp.float32)
  else:
    w = xp.ones(np.shape(batch["input_ids"]), xp.float32)
  if "example_weight" in batch:
    w = w * xp.asarray(batch["example_weight"]).astype(xp.float32)[:, None]
  return w


_FORWARD_KEYS = ("token_type_ids", "segment_ids", "position_ids", "decoder_input_ids",
                 "decoder_attention_mask")


def default_forward(model: nnx.Module, batch: dict) -> Any:
  """model(input_ids, attention_mask, **the batch keys its __call__ accepts)."""
  params = inspect.signature(type(model).__call__).parameters
  kw = {k: batch[k] for k in _FORWARD_KEYS if k in batch and k in params}
  if "project_logits" in params:
    kw["project_logits"] = False  # the head's output is unused
  return model(batch["input_ids"], batch.get("attention_mask"), **kw)


def _as_batches(calibration) -> list[dict]:
  """Calibration batches as dicts of arrays: from an iterable of batch dicts or an int
  array [N, T] of token ids (all real)."""
  if calibration is None:
    raise ConfigError("prune: method='wanda' needs calibration (batches of input_ids, e.g. "
                      "calibration_batches(corpus, cfg.data))")
  if isinstance(calibration, (np.ndarray, jax.Array)):
    ids = np.asarray(calibration)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
      raise ConfigError(f"prune: calibration token ids must be an int array [N, T], got "
                        f"{ids.dtype} {tuple(ids.shape)}")
    calibration = [{"input_ids": ids}]
  batches = []
  for b in calibration:
    if not isinstance(b, dict) or "input_ids" not in b:
      raise ConfigError("prune: each calibration batch must be a dict with 'input_ids'")
    batches.append({k: np.asarray(v) for k, v in b.items()})
  if not batches:
    raise ConfigError("prune: calibration is empty")
  return batches


def calibration_batches(corpus, data_cfg, *, sequences: int = 128, batch_size: int = 32,
                        seed: int = 0, task: str = "causal") -> list[dict]:
  """The first `sequences` examples of the train split as the task builds them (packed
  rows for "causal"), in batches of `batch_size`: Wanda's calibration set."""
  if sequences < 1 or batch_size < 1:
    raise ConfigError(f"prune: calibration sequences ({sequences}) and batch_size "
                      f"({batch_size}) must be positive")
  batches = list(tasks.get(task).eval_batches(corpus, "train", data_cfg,
                                              batch_size=min(batch_size, sequences), seed=seed,
                                              max_batches=-(-sequences // batch_size)))
  # eval_batches stops at max_batches * batch_size rows; drop rows past `sequences`.
  out, left = [], sequences
  for b in batches:
    n = min(left, len(b["input_ids"]))
    out.append({k: v[:n] for k, v in b.items()})
    left -= n
  return [b for b in out if len(b["input_ids"])]


class _Calibrator:
  """Recorders swapped in for the targets, and one compiled forward that accumulates
  their squared inputs; `norms()` runs every batch and returns ||X_i||_2 per target."""

  def __init__(self, model: nnx.Module, targets: list[tuple[tuple, Dense]], batches,
               forward: Callable):
    self.model, self.targets, self.batches = model, targets, batches
    shared = _TokenWeights(jnp.zeros(np.shape(batches[0]["input_ids"]), jnp.float32))
    self.recorders = {}
    for path, dense in targets:
      rec = _Recorder(dense, shared)
      _replace(model, path, rec)
      self.recorders[path] = rec
    self.graphdef = nnx.split(model)[0]

    @jax.jit
    def step(sums, rest, batch):
      w_BT = token_weights(batch, jnp)
      m = nnx.merge(self.graphdef, sums, rest, copy=True)
      m_weights = nnx.state(m, _TokenWeights)
      nnx.update(m, jax.tree.map(lambda _: w_BT, m_weights))
      forward(m, batch)
      return nnx.state(m, _SqSum)

    self.step = step

  def norms(self) -> dict[tuple, jax.Array]:
    for rec in self.recorders.values():
      rec.sq_sum[...] = jnp.zeros_like(rec.sq_sum[...])
    _, sums, rest = nnx.split(self.model, _SqSum, ...)
    for batch in self.batches:
      sums = self.step(sums, rest, batch)
    nnx.update(self.model, sums)
    return {p: jnp.sqrt(r.sq_sum[...]) for p, r in self.recorders.items()}

  def restore(self) -> None:
    for path, rec in self.recorders.items():
      _replace(self.model, path, rec.dense)


def activation_norms(model: nnx.Module, calibration, *, forward: Callable | None = None
                     ) -> dict[str, jax.Array]:
  """kernel name -> ||X_i||_2 [in] of each prunable Dense's input over the calibration
  set's real tokens, from the model as it is (one pass; the model is left unchanged)."""
  targets = prunable_denses(model)
  cal = _Calibrator(model, targets, _as_batches(calibration), forward or default_forward)
  try:
    norms = cal.norms()
  finally:
    cal.restore()
  return {_kernel_name(p): norms[p] for p, _ in targets}


# ---- prune --------------------------------------------------------------------------------
def prune(model: nnx.Module, method: str = "magnitude", sparsity: float | None = None,
          pattern: str = "unstructured", *, scope: str | None = None, calibration=None,
          forward: Callable | None = None, sequential: bool = True
          ) -> tuple[nnx.Module, PruneReport]:
  """Prunes the Dense kernels inside the transformer blocks, in place (module docstring).

  Args:
    method: "magnitude" or "wanda".
    sparsity: the fraction of weights to zero, in [0, 1) (default 0.5); fixed by an N:M
      pattern (1 - N/M), where it may be left unset.
    pattern: "unstructured" or "N:M" such as "2:4".
    scope: what weights compete under "unstructured": "output", "layer" or "global"
      (default: "layer" for magnitude, "output" for wanda).
    calibration: wanda's data: an iterable of batch dicts ("input_ids", optional
      "attention_mask" / "segment_ids" / "position_ids" / "example_weight"), e.g.
      `calibration_batches(corpus, cfg.data)`, or an int array [N, T] of token ids.
    forward: how to run the model on a batch (default `default_forward`).
    sequential: wanda: record each block's inputs with the earlier blocks pruned.

  Returns:
    (model, PruneReport). Raises ConfigError, before changing anything, for a bad
    argument or a model with nothing to prune.
  """
  spec = PruneSpec(method=method, sparsity=sparsity, pattern=pattern, scope=scope)
  targets = prunable_denses(model)
  if not targets:
    raise ConfigError(f"prune: {type(model).__name__} has no Dense q/k/v/o/up/gate/down "
                      "inside transformer blocks (quantized models: prune before quantizing)")
  nm = spec.nm
  for path, d in targets:
    shape = d.kernel.get_value().shape
    if nm is not None and shape[0] % nm[1]:
      raise ConfigError(f"prune: pattern {spec.pattern!r} needs input features divisible by "
                        f"{nm[1]}, but {_kernel_name(path)} has shape {tuple(shape)}")
  batches = _as_batches(calibration) if spec.method == "wanda" else None
  masks: dict[str, jax.Array] = {}
  info: dict[str, int] = {}
  if spec.method == "magnitude":
    scores = {_kernel_name(p): jnp.abs(d.kernel.get_value().astype(jnp.float32))
              for p, d in targets}
    if spec.group == "global":
      masks = global_masks(scores, spec.target)
    else:
      masks = {n: keep_mask(s, spec, n) for n, s in scores.items()}
    for p, d in targets:
      _apply_mask(d, masks[_kernel_name(p)])
  else:
    masks = _wanda(model, targets, spec, batches, forward or default_forward, sequential)
    info = {"sequences": int(sum((np.asarray(b["example_weight"]) > 0).sum()
                                 if "example_weight" in b else len(b["input_ids"])
                                 for b in batches)),
            "tokens": int(sum(token_weights(b).sum() for b in batches))}
  report = PruneReport(spec, masks, layer_sparsity(model, masks), _skipped(model, targets),
                       info)
  return model, report


def _wanda(model, targets, spec, batches, forward, sequential) -> dict[str, jax.Array]:
  """Wanda masks, applied block by block (or all from one pass)."""
  groups: dict[tuple, list] = {}
  for path, d in targets:
    key = _block_of(model, path) if sequential else ()
    groups.setdefault(key, []).append((path, d))
  cal = _Calibrator(model, targets, batches, forward)
  masks = {}
  try:
    for group in groups.values():
      norms = cal.norms()
      for path, d in group:
        w = jnp.abs(d.kernel.get_value().astype(jnp.float32))
        name = _kernel_name(path)
        masks[name] = keep_mask(w * norms[path][:, None], spec, name)
        _apply_mask(d, masks[name])
  finally:
    cal.restore()
  return masks
