"""Orbax checkpoints of the train state plus the JSON-able run state (data iterator
position, early-stopping counters), written together so they always agree."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


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
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    run=ocp.args.JsonSave(run)), force=True)

  def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), run=ocp.args.JsonRestore()))
    return out["state"], out["run"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
