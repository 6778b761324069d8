"""The dense multi-task loss: segmentation CE, depth L1 and normal cosine in one fused op call."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

from torch import Tensor, nn

__all__ = ["DENSE_TASKS", "DenseMultiTaskLoss"]

#: Dense tasks the fused op computes, in the order of its output vector ``[ce, depth_l1, normal_cos]``.
DENSE_TASKS = ("seg", "depth", "normal")


class DenseMultiTaskLoss(nn.Module):
    """Per-task dense losses through one call of ``mtvision.ops.fused_dense_loss``.

    ``task_losses(outputs, batch)`` (also ``forward``): ``outputs`` maps task -> prediction (``"seg"``
    logits ``[B,C,H,W]``, ``"depth"`` ``[B,1,H,W]`` metres, ``"normal"`` ``[B,3,H,W]`` raw), ``batch``
    the collated targets (``"seg"`` int64 ``[B,H,W]``, ``"depth"`` ``[B,1,H,W]``, ``"normal"``
    ``[B,3,H,W]``). Returns the unweighted losses, float32 ``[T]`` in ``tasks`` order (CE in nats,
    depth L1 in metres, normal ``1 - cos``); a balancer decides the weights.

    Args:
        tasks: task names (any order; kept as given); by default a subset of ``DENSE_TASKS``.
        ignore_index: segmentation label skipped by the CE.
        slots: each task's position in the op's ``[ce, depth_l1, normal_cos]`` output (default: its
            position in ``DENSE_TASKS``), for tasks registered under other names.
    """

    def __init__(self, tasks: Sequence[str], ignore_index: int = 255, slots: Optional[Sequence[int]] = None):
        super().__init__()
        tasks = list(tasks)
        if not tasks:
            raise ValueError("DenseMultiTaskLoss: at least one task is required")
        if slots is None:
            for t in tasks:
                if t not in DENSE_TASKS:
                    raise ValueError(f"DenseMultiTaskLoss: unknown task {t!r} "
                                     f"(dense tasks: {', '.join(DENSE_TASKS)})")
            slots = [DENSE_TASKS.index(t) for t in tasks]
        slots = [int(s) for s in slots]
        if len(set(tasks)) != len(tasks) or len(set(slots)) != len(slots) or len(slots) != len(tasks):
            raise ValueError(f"DenseMultiTaskLoss: duplicate task in {tasks} (slots {slots})")
        if any(s not in (0, 1, 2) for s in slots):
            raise ValueError(f"DenseMultiTaskLoss: slots must be 0 (ce), 1 (depth L1) or 2 (normal cos), got {slots}")
        self.tasks = tasks
        self.ignore_index = int(ignore_index)
        self._slots = slots

    def task_losses(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        """Unweighted per-task losses, float32 ``[T]`` in ``self.tasks`` order (differentiable)."""
        from mtvision.ops import fused_dense_loss  # the C++ extension loads on first use only

        args: list[Optional[Tensor]] = [None] * 6
        for t, slot in zip(self.tasks, self._slots):
            if t not in outputs:
                raise KeyError(f"DenseMultiTaskLoss: model outputs lack task {t!r} (got {sorted(outputs)})")
            if t not in batch:
                raise KeyError(f"DenseMultiTaskLoss: batch lacks the {t!r} target (got {sorted(batch)})")
            args[2 * slot], args[2 * slot + 1] = outputs[t], batch[t]
        losses = fused_dense_loss(*args, ignore_index=self.ignore_index)
        return losses[self._slots]

    forward = task_losses

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, ignore_index={self.ignore_index}"
