"""Logical axis names -> mesh axes.

Layers name the dimensions of their parameters ("embed", "mlp", "heads", ...) in a
`axes` metadata entry of each nnx.Param and mark key activations with `constrain`. The
config's rule table (`mesh.rules`) maps each logical name to a mesh axis (or several, or
None), as in Flax's lm1b example and big_vision. A dimension that a mesh axis does not
divide stays replicated over it rather than failing (tiny test models have 2 heads).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

# FSDP shards parameters along `embed`; the batch splits over every data-like axis.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("length", None),
    ("head_dim", None),
)

Rules = Sequence[tuple[str, Any]]


def _mesh_axes(rule_value) -> tuple[str, ...]:
  if rule_value is None:
    return ()
  return (rule_value,) if isinstance(rule_value, str) else tuple(rule_value)


def logical_to_spec(axes: Sequence[str | None] | None, rules: Rules,
                    mesh: jax.sharding.Mesh, shape: Sequence[int] | None = None) -> PartitionSpec:
  """The PartitionSpec for one array. Each mesh axis is used at most once (first dim
  wins), size-1 mesh axes are dropped, and with `shape` a dim keeps only the leading
  mesh axes whose product divides it."""
  if not axes:
    return PartitionSpec()
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for d, name in enumerate(axes):
    chosen, size = [], 1
    for m in _mesh_axes(table.get(name)) if name else ():
      n = mesh.shape[m]
      if m in used or n == 1:
        continue
      if shape is not None and shape[d] % (size * n):
        break
      chosen.append(m)
      size *= n
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return PartitionSpec(*spec)


def param_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
  return variable.get_metadata().get("axes")


def state_shardings(state, mesh: jax.sharding.Mesh, rules: Rules):
  """NamedSharding for every Variable in an nnx.State (abstract or concrete), from its
  `axes` metadata; a Variable without one is replicated."""

  def one(v):
    return NamedSharding(mesh, logical_to_spec(param_axes(v), rules, mesh, v.get_value().shape))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ---- activations --------------------------------------------------------------------
_active = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh | None, rules: Rules):
  """Within this context (while tracing), `constrain` pins activations to the rules."""
  old = getattr(_active, "value", None)
  _active.value = (mesh, tuple(rules)) if mesh is not None else None
  try:
    yield
  finally:
    _active.value = old


def sharded_over_devices() -> bool:
  """Whether `activation_sharding` is in effect with a mesh of more than one device."""
  active = getattr(_active, "value", None)
  return active is not None and active[0].size > 1


def constrain(x, axes: Sequence[str | None]):
  """with_sharding_constraint by logical names; a no-op outside `activation_sharding`
  (a single device, a notebook)."""
  active = getattr(_active, "value", None)
  if active is None:
    return x
  mesh, rules = active
  spec = logical_to_spec(axes, rules, mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ---- sharded state ----------------------------------------------------------------------
def create_sharded(make_module, mesh: jax.sharding.Mesh, rules: Rules) -> nnx.Module:
  """Builds `make_module()` directly in its sharded layout: shapes come from an abstract
  (eval_shape) build, and the jitted init writes each device's shard only, so no host
  ever holds the full parameters."""
  abstract = nnx.eval_shape(make_module)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh, rules)
  state = jax.jit(lambda: nnx.state(make_module()), out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def shard_module(module: nnx.Module, mesh: jax.sharding.Mesh, rules: Rules) -> nnx.Module:
  """Moves an existing module's state (e.g. a loaded checkpoint) into the layout."""
  state = nnx.state(module)
  nnx.update(module, jax.device_put(state, state_shardings(state, mesh, rules)))
  return module


def like_params_shardings(tree, params, param_shardings, mesh: jax.sharding.Mesh):
  """Shardings for a tree (optimizer state) whose leaves mirror parameters: a leaf whose
  path ends with a parameter's path (Adam's mu/nu) takes that parameter's sharding;
  anything else (step counters) is replicated."""
  # Leaf paths of params (they end in the Variable's `.value`) and their shardings.
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_shardings = jax.tree.leaves(param_shardings,
                                   is_leaf=lambda x: isinstance(x, NamedSharding))
  by_path = {tuple(p): s for (p, _), s in zip(flat_params, flat_shardings, strict=True)}
  shapes = {tuple(p): x.shape for p, x in flat_params}
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(path, leaf):
    path = tuple(path)
    for i in range(len(path)):
      if path[i:] in by_path and shapes[path[i:]] == leaf.shape:
        return by_path[path[i:]]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree)
