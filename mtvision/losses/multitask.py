"""The training loss of any mix of tasks: the dense ones in one fused op call, detection with FCOS."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from .dense import DENSE_TASKS, DenseMultiTaskLoss
from .detection import FCOSLoss

__all__ = ["DETECTION_TASK", "TASKS", "TARGET_KEYS", "MultiTaskLoss"]

#: The detection task's name; its targets are the batch's ``boxes`` and ``labels`` lists.
DETECTION_TASK = "det"
#: Every task a model can train, in a fixed order.
TASKS = (*DENSE_TASKS, DETECTION_TASK)
#: The batch keys holding each task's targets.
TARGET_KEYS = {"seg": ("seg",), "depth": ("depth",), "normal": ("normal",),
               DETECTION_TASK: ("boxes", "labels")}


class MultiTaskLoss(nn.Module):
    """Unweighted per-task losses of a batch, ``task_losses(outputs, batch) -> float32 [T]`` in ``tasks``
    order (differentiable): the dense tasks through :class:`DenseMultiTaskLoss` (one fused op call),
    ``det`` through ``detection`` (:class:`FCOSLoss`) on ``batch["boxes"]`` / ``batch["labels"]``.

    Args:
        tasks: subset of ``TASKS``, any order (kept as given).
        ignore_index: segmentation label skipped by the CE.
        detection: the detection loss; required when ``det`` is a task.
    """

    def __init__(self, tasks: Sequence[str], ignore_index: int = 255, detection: Optional[FCOSLoss] = None):
        super().__init__()
        tasks = list(tasks)
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"MultiTaskLoss: tasks must be distinct names from {', '.join(TASKS)}, "
                             f"got {tasks}")
        if DETECTION_TASK in tasks and detection is None:
            raise ValueError("MultiTaskLoss: the det task needs its detection loss")
        self.tasks = tasks
        dense = [t for t in tasks if t in DENSE_TASKS]
        self.dense = DenseMultiTaskLoss(dense, None, ignore_index) if dense else None
        self.detection = detection if DETECTION_TASK in tasks else None
        # losses come out as [dense tasks..., det]: the permutation back to ``tasks`` order (None: same order)
        order = [*dense, *([DETECTION_TASK] if self.detection is not None else [])]
        self._order = None if order == tasks else [order.index(t) for t in tasks]

    def task_losses(self, outputs: Mapping[str, Tensor], batch: Mapping[str, object]) -> Tensor:
        parts = []
        if self.dense is not None:
            parts.append(self.dense.task_losses(outputs, batch))
        if self.detection is not None:
            if DETECTION_TASK not in outputs:
                raise KeyError(f"MultiTaskLoss: model outputs lack task 'det' (got {sorted(outputs)})")
            missing = [k for k in TARGET_KEYS[DETECTION_TASK] if k not in batch]
            if missing:
                raise KeyError(f"MultiTaskLoss: batch lacks the det targets {missing} (got {sorted(batch)})")
            parts.append(self.detection(outputs[DETECTION_TASK], batch["boxes"], batch["labels"]).view(1))
        losses = parts[0] if len(parts) == 1 else torch.cat(parts)
        return losses if self._order is None else losses[self._order]

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}"
