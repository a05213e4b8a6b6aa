"""Orbax checkpoints of the train state plus the JSON-able run state (data iterator
position, early-stopping counters), written together so they always agree.

Faults: a save that cannot write (disk full, permissions) is a one-line DataError naming
the directory, and the previous checkpoints stay as they were (orbax writes each step to
a temporary directory and only then renames it into place, and drops old steps after
that). A checkpoint that cannot be read back is skipped for the one before it
(`restore_latest`)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from jaxlm.errors import ConfigError, DataError

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

  def __init__(self, directory: str, *, max_to_keep: int, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    # Synchronous saves: the train step donates its buffers, and a save must not read
    # arrays that the next step is already overwriting. read_only (--mode=eval): nothing
    # in the directory is created, cleaned up or deleted.
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                             enable_async_checkpointing=False,
                                             read_only=read_only),
        item_names=("state", "run"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, run: dict[str, Any]) -> None:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), run=ocp.args.JsonSave(run))
    dying = _KILL_IN_SAVE_AT_STEP == step
    try:
      with _killed_before_finalize() if dying else contextlib.nullcontext():
        self.manager.save(step, args=args, force=True)
    except OSError as e:
      raise DataError(f"cannot write the step-{step} checkpoint in {self.directory}: "
                      f"{e.strerror or e} (the previous checkpoints are intact)") from None

  def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), run=ocp.args.JsonRestore()))
    return out["state"], out["run"]

  def restore_latest(self, like: Any, log: Callable[[str], None]):
    """(state, run, step) of the newest checkpoint that restores, or None when there are
    none. One that cannot be read (truncated, garbled, files missing) is reported and
    the one before it tried; if none restores, a one-line ConfigError."""
    steps = self.all_steps()
    failures = []
    for step in reversed(steps):
      try:
        with _quiet_absl():  # orbax logs its own error lines; ours says it in one
          state, run = self.restore(step, like)
      except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many kinds)
        reason = _one_line(e)
        failures.append(f"step {step}: {reason}")
        older = [s for s in steps if s < step]
        log(f"checkpoint at step {step} cannot be restored ({reason}); "
            + (f"trying step {older[-1]}" if older else "no older checkpoint"))
        continue
      self._set_aside([s for s in steps if s > step])
      return state, run, step
    if steps:
      raise ConfigError(f"no checkpoint in {self.directory} can be restored ("
                        + "; ".join(failures) + "); rerun with --fresh to start over (the "
                        "checkpoints are moved aside, not deleted)")
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unrestorable checkpoints out of the way (never deleted), so that the resumed
    run can write those steps again."""
    if not steps or self.read_only:
      return
    aside = f"{self.directory}.unrestorable-{time.strftime('%Y%m%d-%H%M%S')}"
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      os.rename(os.path.join(self.directory, str(step)), os.path.join(aside, str(step)))
    self.manager.reload()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


@contextlib.contextmanager
def _quiet_absl():
  from absl import logging  # noqa: PLC0415
  level = logging.get_verbosity()
  logging.set_verbosity(logging.FATAL)
  try:
    yield
  finally:
    logging.set_verbosity(level)


def _one_line(e: BaseException) -> str:
  msg = " ".join(str(e).split()) or type(e).__name__
  return msg if len(msg) <= 200 else msg[:197] + "..."


def move_aside(directory: str) -> str | None:
  """--fresh: renames a checkpoint directory to <dir>.stale-<time> (never deletes it)."""
  if not os.path.isdir(directory):
    return None
  target = f"{directory}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
  os.rename(directory, target)
  return target
