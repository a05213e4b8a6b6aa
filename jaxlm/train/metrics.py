"""metrics.jsonl and TensorBoard event files in the workdir."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from tensorboardX import SummaryWriter

from jaxlm.errors import DataError


def _clean(v):
  v = float(v)
  return v if math.isfinite(v) else None


class MetricsWriter:
  """One JSON object per logged row. On resume, rows past the restored step (written
  after the last checkpoint by a run that died) are dropped, so the file reads as one
  uninterrupted run."""

  def __init__(self, workdir: str, *, resume_step: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(self.path):
      with open(self.path, encoding="utf-8") as f:
        rows = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
      with open(self.path, "w", encoding="utf-8") as f:
        f.writelines(rows)
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    row = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
    try:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    except OSError as e:
      raise DataError(f"cannot write {self.path}: {e.strerror or e}") from None
    for k, v in row.items():
      if k != "step" and v is not None:
        self.tb.add_scalar(k, v, step)

  def close(self) -> None:
    self.tb.flush()
    self.tb.close()
