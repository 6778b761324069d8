"""The dense multi-task loss: segmentation CE, depth L1 and normal cosine in one fused op call."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["DENSE_TASKS", "DenseMultiTaskLoss"]

#: Dense tasks the fused op computes, in the order of its output vector ``[ce, depth_l1, normal_cos]``.
DENSE_TASKS = ("seg", "depth", "normal")


class DenseMultiTaskLoss(nn.Module):
    """Per-task dense losses through one call of ``mtvision.ops.fused_dense_loss``.

    ``forward(outputs, batch) -> dict``: ``outputs`` maps task -> prediction (``"seg"`` logits
    ``[B,C,H,W]``, ``"depth"`` ``[B,1,H,W]`` metres, ``"normal"`` ``[B,3,H,W]`` raw), ``batch`` the
    collated targets (``"seg"`` int64 ``[B,H,W]``, ``"depth"`` ``[B,1,H,W]``, ``"normal"`` ``[B,3,H,W]``).
    Returns float32 scalar tensors: one per task in ``tasks`` (CE in nats, depth L1 in metres, normal
    ``1 - cos``), and ``"total"`` = ``sum_t weights[t] * loss[t]``.

    ``task_losses(outputs, batch)`` gives the unweighted losses as one ``[T]`` vector in ``tasks``
    order, for a balancer that decides the weights itself.

    Args:
        tasks: subset of ``DENSE_TASKS`` (any order; kept as given).
        weights: static weight per task (missing tasks weigh 1.0); the config's ``loss.weights``.
        ignore_index: segmentation label skipped by the CE.
    """

    def __init__(self, tasks: Sequence[str], weights: Optional[Mapping[str, float]] = None,
                 ignore_index: int = 255):
        super().__init__()
        tasks = list(tasks)
        if not tasks:
            raise ValueError("DenseMultiTaskLoss: at least one task is required")
        for t in tasks:
            if t not in DENSE_TASKS:
                raise ValueError(f"DenseMultiTaskLoss: unknown task {t!r} "
                                 f"(dense tasks: {', '.join(DENSE_TASKS)})")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"DenseMultiTaskLoss: duplicate task in {tasks}")
        weights = dict(weights or {})
        for t, w in weights.items():
            if t not in tasks:
                raise ValueError(f"loss.weights.{t}: no such task in this model (tasks: {', '.join(tasks)})")
            if not (float(w) >= 0.0):
                raise ValueError(f"loss.weights.{t}: must be >= 0, got {w!r}")
        self.tasks = tasks
        self.ignore_index = int(ignore_index)
        self.register_buffer(
            "weights", torch.tensor([float(weights.get(t, 1.0)) for t in tasks], dtype=torch.float32),
            persistent=False)
        # Position of each of our tasks in the op's [ce, depth_l1, normal_cos] output.
        self._slots = [DENSE_TASKS.index(t) for t in tasks]

    def task_losses(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        """Unweighted per-task losses, float32 ``[T]`` in ``self.tasks`` order (differentiable)."""
        from mtvision.ops import fused_dense_loss  # the C++ extension loads on first use only

        args = []
        for t in DENSE_TASKS:
            if t in self.tasks:
                if t not in outputs:
                    raise KeyError(f"DenseMultiTaskLoss: model outputs lack task {t!r} "
                                   f"(got {sorted(outputs)})")
                if t not in batch:
                    raise KeyError(f"DenseMultiTaskLoss: batch lacks the {t!r} target (got {sorted(batch)})")
                args += [outputs[t], batch[t]]
            else:
                args += [None, None]
        losses = fused_dense_loss(*args, ignore_index=self.ignore_index)
        return losses[self._slots]

    def combine(self, task_losses: Tensor, weights: Optional[Tensor] = None) -> dict[str, Tensor]:
        """``{task: loss, ..., "total": weighted sum}`` from a ``[T]`` vector; ``weights`` default: static."""
        w = self.weights if weights is None else weights
        out = {t: task_losses[i] for i, t in enumerate(self.tasks)}
        out["total"] = (w.to(task_losses.device, task_losses.dtype) * task_losses).sum()
        return out

    def forward(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.combine(self.task_losses(outputs, batch))

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, weights={self.weights.tolist()}, ignore_index={self.ignore_index}"
