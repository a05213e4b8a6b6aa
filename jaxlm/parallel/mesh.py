"""The device mesh from the config's `mesh` section.

Four named axes, always in this order: `data` (pure data parallelism), `fsdp` (data
parallelism whose parameters and optimizer state are sharded too), `tensor` (heads and
MLP columns split across devices) and `expert` (MoE experts split across devices). Their
product is the device count; one of them may be -1, meaning "the rest".
"""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType

from jaxlm.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "expert")


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """{axis: size} with -1 resolved; a one-line ConfigError when it cannot fit."""
  sizes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
  spelled = " x ".join(f"{a}={s}" for a, s in sizes.items())
  rest = [a for a, s in sizes.items() if s == -1]
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad or len(rest) > 1:
    raise ConfigError(f"mesh: sizes must be positive with at most one -1, got {spelled}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if rest:
    if num_devices % known:
      raise ConfigError(f"mesh: {spelled} does not divide the {num_devices} devices "
                        f"({num_devices} is not a multiple of {known})")
    sizes[rest[0]] = num_devices // known
  elif known != num_devices:
    raise ConfigError(f"mesh: {spelled} needs {known} devices, but there are {num_devices}")
  return sizes


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """A mesh over all (or the given) devices, with Auto axes: XLA propagates shardings
  from the annotated parameters and activations (the classic GSPMD behaviour)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(tuple(shape.values()), MESH_AXES, devices=devices,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  """How many ways the batch is split: data x fsdp x expert (experts also split tokens)."""
  return mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
