"""Parameter trees as flat dicts of named arrays ("model.layers.0.attn.q.kernel").

A leaf module: the model classes, the Hugging Face mappings and the checkpoint code all
name parameters the same way through it, and it imports none of them.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.errors import DataError


def path_name(path) -> str:
  """An nnx state path (("model", "layers", 0, "attn")) as a dotted name."""
  return ".".join(str(k) for k in path)


def _flat(model: nnx.Module) -> dict[str, nnx.Variable]:
  return {path_name(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
  """Every parameter as a NumPy array, by dotted name."""
  return {name: np.asarray(v.get_value()) for name, v in _flat(model).items()}


def param_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  """Every parameter's shape, by dotted name (works on shape-only models)."""
  return {name: tuple(v.get_value().shape) for name, v in _flat(model).items()}


def load_params(model: nnx.Module, tensors: dict[str, np.ndarray], source: str) -> nnx.Module:
  """Copies tensors into the model by name, cast to each parameter's dtype; a missing,
  extra or misshapen tensor is a DataError naming it and `source`."""
  state = nnx.state(model, nnx.Param)
  expected = {path_name(p): v for p, v in nnx.to_flat_state(state)}
  for name, var in expected.items():
    if name not in tensors:
      raise DataError(f"{source}: missing tensor {name!r}")
    value, want = tensors[name], var.get_value()
    if tuple(value.shape) != tuple(want.shape):
      raise DataError(f"{source}: tensor {name!r} has shape {tuple(value.shape)}, "
                      f"expected {tuple(want.shape)}")
    var.set_value(jnp.asarray(value, dtype=want.dtype))
  extra = sorted(set(tensors) - set(expected))
  if extra:
    raise DataError(f"{source}: unexpected tensor {extra[0]!r} (and {len(extra) - 1} more)")
  nnx.update(model, state)
  return model
