"""The printed end-of-run report: the headline numbers, then the task's own lines (its
metrics and the samples it put in report.json; see Task.samples / Task.report_lines)."""

from __future__ import annotations

from typing import Any

from jaxlm.tasks import Task
from jaxlm.tasks.base import fmt


def format_report(rep: dict[str, Any], task: Task) -> str:
  lines = ["== jaxlm report ==",
           f"params {fmt(rep, 'params')} | tokens seen {fmt(rep, 'tokens_seen')} | steps "
           f"{fmt(rep, 'steps')} | wall {rep['wall_seconds']:.0f}s"]
  return "\n".join(lines + task.report_lines(rep))
