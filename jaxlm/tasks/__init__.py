"""Training objectives, one registered `Task` per module; `get(name)` looks one up.

The train loop, the steps, the evaluator and the report know no objective by name: they
call the task that `train.objective` names. To add one, see tasks/base.py's docstring.
"""

from jaxlm.tasks import (  # noqa: F401 (registers)
    causal, classify, contrastive, distill, extractive_qa, mlm, mlm_nsp, nsp, sft, sop,
    span_corruption, token_classify)
from jaxlm.tasks.base import TASKS, Task, get, register

__all__ = ["TASKS", "Task", "get", "register"]
