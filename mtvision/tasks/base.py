"""``Task``: everything mtvision knows about one task, in one place.

A task says which batch keys hold its targets, how its loss and its metric are computed from the head's
output, which metric judges it (``primary_metric``, for ``best.pth`` and Δm) and in which direction,
and what its head must be. The loss, the trainer, the evaluator, the config checks, Δm and the ONNX
export ask the task instead of keeping their own tables. A new task is one module defining a
``Task`` subclass registered with ``@TASKS.register("name")`` (``docs/architecture.md`` shows one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

__all__ = ["Task", "builtin_delta_metrics", "builtin_directions", "check_num_classes"]


class Task:
    """One task of a multi-task model, built per run as ``TASKS[name](name, num_classes, ignore_index,
    head)``.

    Class attributes a subclass sets:
        target_keys: the batch keys holding the targets (the loader must give them).
        higher_is_better: every scalar metric name the metric reports -> True where larger is better.
        primary_metric: the metric the task is judged by (``best.pth``'s score).
        delta_metrics: the metrics Δm is taken over when a whole metrics file is the baseline.
        fused_slot: position in ``mtvision.ops.fused_dense_loss``'s ``[ce, depth_l1, normal_cos]``
            output for the three built-in dense tasks (computed together in one op call); ``None``
            for a task with its own :meth:`build_loss`.
        class_named: the metric's per-class lists are named by the dataset's classes
            (``seg/IoU/<class>``).

    Args:
        name: the task's name (the ``model.heads`` key).
        num_classes: ``data.num_classes``.
        ignore_index: the segmentation label skipped by losses and metrics (``loss.ignore_index``).
        head: the task's head (``None`` where no model is involved, e.g. scoring saved predictions).
    """

    target_keys: ClassVar[tuple[str, ...]] = ()
    higher_is_better: ClassVar[Mapping[str, bool]] = {}
    primary_metric: ClassVar[str] = ""
    delta_metrics: ClassVar[tuple[str, ...]] = ()
    fused_slot: ClassVar[Optional[int]] = None
    class_named: ClassVar[bool] = False

    def __init__(self, name: str, num_classes: int = 0, ignore_index: int = 255,
                 head: Optional[nn.Module] = None):
        self.name = name
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.head = head

    @classmethod
    def check_config(cls, name: str, head_spec: Mapping[str, Any], cfg) -> None:
        """Raise ConfigError naming the key when ``model.heads.<name>`` (``head_spec``) or the rest of
        ``cfg`` cannot train this task; the base version accepts anything."""

    def build_loss(self) -> Optional[nn.Module]:
        """The loss ``loss(output, batch) -> scalar`` (a module or a function; ``None`` for the fused
        dense tasks)."""
        return None

    def build_metric(self):
        """A fresh metric with ``update``, ``compute() -> dict`` and ``reset`` (summed across processes)."""
        raise NotImplementedError(f"task {self.name!r} defines no metric")

    def predict(self, output: Tensor, image_size) -> Any:
        """The head's raw output -> the prediction the metric scores and a writer sees (decoded boxes for
        detection); the raw output by default."""
        return output

    def update_metric(self, metric, prediction: Any, batch: Mapping[str, Any], device: torch.device) -> None:
        """Feed one batch's prediction and targets to ``metric``; by default ``metric.update(prediction,
        batch[target_keys[0]])``."""
        metric.update(prediction.float(), batch[self.target_keys[0]].to(device, non_blocking=True))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def check_num_classes(name: str, head_spec: Mapping[str, Any], cfg) -> None:
    """ConfigError when ``model.heads.<name>.num_classes`` differs from ``data.num_classes`` (the
    task's labels are the dataset's class ids)."""
    from ..config import ConfigError

    n = head_spec.get("num_classes") if isinstance(head_spec, Mapping) else None
    if n is not None and n != cfg.data.num_classes:
        raise ConfigError(f"model.heads.{name}.num_classes ({n}) differs from data.num_classes "
                          f"({cfg.data.num_classes})")


def builtin_directions(*names: str) -> dict[str, bool]:
    """``{name: higher is better}`` of built-in metric names, from the evaluation package's one table
    (``mtvision.evaluation.HIGHER_IS_BETTER``)."""
    from ..evaluation import HIGHER_IS_BETTER

    return {n: HIGHER_IS_BETTER[n] for n in names}


def builtin_delta_metrics(task: str) -> tuple[str, ...]:
    """The metric names of ``task`` in ``mtvision.evaluation.DELTA_M_METRICS`` (the Δm convention)."""
    from ..evaluation import DELTA_M_METRICS

    return tuple(k.split("/", 1)[1] for k in DELTA_M_METRICS if k.split("/", 1)[0] == task)
