"""Tasks: what each task trains on, its loss and metric, and how it is judged (``mtvision.registry.TASKS``).

``build_tasks(names, num_classes, ignore_index, heads)`` gives one :class:`Task` per name, in order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

from torch import nn

from ..registry import TASKS
from .base import Task
from .dense import DepthTask, NormalTask, SegmentationTask
from .detection import DetectionTask

__all__ = ["Task", "SegmentationTask", "DepthTask", "NormalTask", "DetectionTask", "build_tasks",
           "primary_metric_key", "metric_direction"]


def build_tasks(names: Sequence[str], num_classes: int = 0, ignore_index: int = 255,
                heads: Optional[Mapping[str, nn.Module]] = None) -> list[Task]:
    """One :class:`Task` per name (``TASKS[name](name, num_classes, ignore_index, heads[name])``);
    ValueError naming an unregistered task."""
    out = []
    for name in names:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r} (registered tasks: {', '.join(TASKS)})")
        head = heads[name] if heads is not None and name in heads else None
        out.append(TASKS[name](name, num_classes, ignore_index, head))
    return out


def primary_metric_key(task: str) -> Optional[str]:
    """``"task/metric"`` of the registered task's primary metric (``None`` for an unknown task)."""
    cls = TASKS.get(task)
    return f"{task}/{cls.primary_metric}" if cls is not None and cls.primary_metric else None


def metric_direction(key: str) -> Optional[bool]:
    """True / False where the registered task of ``"task/metric"`` says larger is / is not better;
    ``None`` when no task knows the metric."""
    task, _, metric = key.partition("/")
    cls = TASKS.get(task)
    if cls is None:
        return None
    return cls.higher_is_better.get(metric)
