"""Orbax checkpoints of the train state plus the JSON-able run state (data iterator
position, early-stopping counters), written together so they always agree."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp

# Fault injection for the tests: SIGKILL inside the save at this step, after its
# temporary directory is written and before it is finalized (renamed into place).
_KILL_IN_SAVE_AT_STEP = int(os.environ.get("JAXLM_KILL_IN_SAVE_AT_STEP", "0"))


@contextlib.contextmanager
def _killed_before_finalize():
  """Every orbax temporary-path class dies (SIGKILL, no cleanup) when asked to finalize."""
  from orbax.checkpoint._src.path import atomicity  # noqa: PLC0415 (tests only)
  classes = [c for c in vars(atomicity).values()
             if isinstance(c, type) and "finalize" in vars(c)]

  async def die(self, *args, **kwargs):
    del self, args, kwargs
    os.kill(os.getpid(), signal.SIGKILL)

  saved = {c: vars(c)["finalize"] for c in classes}
  for c in classes:
    c.finalize = die
  try:
    yield
  finally:
    for c, f in saved.items():
      c.finalize = f


class Checkpointer:

  def __init__(self, directory: str, *, max_to_keep: int):
    self.directory = os.path.abspath(directory)
    # Synchronous saves: the train step donates its buffers, and a save must not read
    # arrays that the next step is already overwriting.
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False),
        item_names=("state", "run"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, run: dict[str, Any]) -> None:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), run=ocp.args.JsonSave(run))
    with _killed_before_finalize() if step == _KILL_IN_SAVE_AT_STEP else contextlib.nullcontext():
      self.manager.save(step, args=args, force=True)

  def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), run=ocp.args.JsonRestore()))
    return out["state"], out["run"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
