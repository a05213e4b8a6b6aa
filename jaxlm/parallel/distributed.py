"""Multi-host jobs through JAX's own multi-controller runtime.

Every host runs the same `python -m jaxlm.main` command; `initialize` joins them into one
job (`jax.distributed.initialize`), with explicit flags or, on TPU pods, Slurm and Open
MPI, from what JAX detects. Each process then feeds its own slice of every global batch
(`put_batch`), and only the primary process writes shared files (metrics, the exported
model, the report); Orbax coordinates checkpoint writes itself.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlm.errors import ConfigError


def detect_cluster() -> tuple[str, int] | None:
  """(name, process count) of the cluster that JAX's own auto-detection finds (a TPU pod
  slice, Slurm, Open MPI, Kubernetes), or None: the very checks that
  jax.distributed.initialize() makes when called with no arguments."""
  from jax._src import clusters  # noqa: PLC0415 (private, but no public equivalent)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # e.g. "Kubernetes detected, but no kubernetes package"
    for env in clusters.ClusterEnv._cluster_types:  # noqa: SLF001
      if not env.opt_in_only_method and env.is_env_present():
        return env.name, env.get_process_count()
  return None


def _check_address(address: str) -> None:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(f"--coordinator_address must be HOST:PORT (process 0's address and "
                      f"a free port), got {address!r}")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins the multi-host job; returns whether it did. With no arguments, it initializes
  only where JAX detects a cluster of more than one process, and skips on a single host
  (where, under Slurm, joining would also limit a GPU process to one device)."""
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ConfigError("--coordinator_address, --num_processes and --process_id go "
                        "together: give all three or none")
    _check_address(coordinator_address)
    if num_processes < 1:
      raise ConfigError(f"--num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
      raise ConfigError(f"--process_id {process_id} is outside 0..{num_processes - 1} "
                        f"(--num_processes={num_processes})")
  else:
    found = detect_cluster()
    if found is None or found[1] <= 1:
      return False
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  except (RuntimeError, ValueError) as e:  # unreachable coordinator, duplicate id, ...
    where = coordinator_address or "the detected cluster"
    raise ConfigError(f"could not join the multi-host job ({where}): {e}") from e
  return True


def is_primary() -> bool:
  return jax.process_index() == 0


def sync(name: str) -> None:
  """A barrier across processes (a no-op on one)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """Whether `flag` holds on any process; every process must call it (it is a barrier
  too). Lets all processes fail together when one of them hits an error, instead of
  the others waiting for it forever."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.process_allgather(np.asarray(flag, np.int32)).any())


def process_sum(n: int) -> int:
  """The sum of a non-negative int over all processes (every process must call it)."""
  if jax.process_count() == 1:
    return n
  hi_lo = np.asarray([n >> 31, n & (2**31 - 1)], np.int32)  # exact past int32 (no x64)
  hi, lo = multihost_utils.process_allgather(hi_lo).astype(np.int64).sum(0)
  return int(hi) * 2**31 + int(lo)


class BatchSplit(NamedTuple):
  part: int  # the block of every global batch that this process feeds
  parts: int  # how many blocks
  first_reader: bool  # no lower process feeds the same block (one count of its tokens)


def batch_split(sharding, global_batch_size: int) -> BatchSplit:
  """Every global batch is cut into `parts` equal blocks of rows (as one process would
  read them), and this process feeds block `part` to its devices.

  Processes whose devices hold the same rows under the batch `sharding` (replicas: the
  batch axes do not span them, e.g. `mesh.tensor` across hosts) read the same block. A
  block goes to the process's devices in their row order: the very batch a single
  process builds when each host's devices hold contiguous rows, else a permutation of
  its rows (the same loss)."""
  if jax.process_count() == 1:
    return BatchSplit(0, 1, True)
  rows: dict[int, set] = {}
  for device, (span, *_) in sharding.devices_indices_map((global_batch_size,)).items():
    rows.setdefault(device.process_index, set()).add(
        (span.start or 0, global_batch_size if span.stop is None else span.stop))
  block_of = {p: tuple(sorted(r)) for p, r in rows.items()}
  blocks = sorted(set(block_of.values()))
  sizes = {sum(b - a for a, b in block) for block in blocks}
  if len(sizes) != 1 or sizes.pop() * len(blocks) != global_batch_size:
    raise ConfigError(f"mesh: the processes' devices hold overlapping, unequal parts of the "
                      f"batch ({blocks}); make each batch axis span whole hosts")
  me = jax.process_index()
  return BatchSplit(blocks.index(block_of[me]), len(blocks),
                    min(p for p, b in block_of.items() if b == block_of[me]) == me)


def local_rows(sharding, global_batch_size: int) -> tuple[int, int]:
  """(first row, row count) of the block of each global batch that this process feeds
  (see `batch_split`)."""
  split = batch_split(sharding, global_batch_size)
  n = global_batch_size // split.parts
  return split.part * n, n


def put_batch(batch: dict[str, Any], sharding) -> dict[str, Any]:
  """Host arrays -> global jax.Arrays sharded along the batch. Single process: the whole
  batch. Multi-host: this process's rows (see `local_rows`), which
  jax.make_array_from_process_local_data spreads over its devices' slices of the batch."""
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def fully_replicated_host(tree):
  """Every array in full on this host (multi-host: gathered from all processes)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
