"""The settings a run can be (``base.Task``): the classifier one and the contrastive (CLIP) one.
:func:`task_for` is the one place that looks at whether a run has a ``clip`` section."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Task
from .classifier import ClassifierTask
from .contrastive import ContrastiveTask

if TYPE_CHECKING:
    from ..schema import RunConfig

__all__ = ["ClassifierTask", "ContrastiveTask", "Task", "task_for"]


def task_for(cfg: RunConfig) -> Task:
    """The task of the run ``cfg``: contrastive with a ``clip`` section, else the classifier's."""
    return ContrastiveTask(cfg) if cfg.clip is not None else ClassifierTask(cfg)
