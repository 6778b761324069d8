"""The training loss of any mix of tasks: the fused dense tasks in one op call, every other task through
its own loss module (``Task.build_loss``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..tasks import Task
from .dense import DenseMultiTaskLoss

__all__ = ["MultiTaskLoss"]


class MultiTaskLoss(nn.Module):
    """Unweighted per-task losses of a batch, ``task_losses(outputs, batch) -> float32 [T]`` in ``tasks``
    order (differentiable). Tasks with a ``fused_slot`` (seg, depth, normal) share one call of the fused
    op; the others call the module their ``build_loss()`` gives, as ``loss(outputs[name], batch)``.

    Args:
        tasks: the run's :class:`~mtvision.tasks.Task` objects (built with their heads), in loss order.
    """

    def __init__(self, tasks: Sequence[Task]):
        super().__init__()
        tasks = list(tasks)
        names = [t.name for t in tasks]
        if not tasks or len(set(names)) != len(names):
            raise ValueError(f"MultiTaskLoss: tasks must be distinct, got {names}")
        self.tasks = names
        fused = [t for t in tasks if t.fused_slot is not None]
        self.dense = (DenseMultiTaskLoss([t.name for t in fused], fused[0].ignore_index,
                                         [t.fused_slot for t in fused]) if fused else None)
        own = {t.name: t.build_loss() for t in tasks if t.fused_slot is None}
        for name, loss in own.items():
            if not callable(loss):
                raise ValueError(f"MultiTaskLoss: task {name!r} has no fused slot and its build_loss() gives "
                                 f"{loss!r}, not a loss(output, batch) callable")
        self.own = nn.ModuleDict({n: f if isinstance(f, nn.Module) else _FunctionLoss(f)
                                  for n, f in own.items()})
        # losses come out as [fused tasks..., own tasks...]: the permutation back to ``tasks`` order
        order = [t.name for t in fused] + list(self.own)
        self._order = None if order == names else [order.index(n) for n in names]

    def task_losses(self, outputs: Mapping[str, Tensor], batch: Mapping[str, object]) -> Tensor:
        parts = []
        if self.dense is not None:
            parts.append(self.dense.task_losses(outputs, batch))
        for name, loss in self.own.items():
            if name not in outputs:
                raise KeyError(f"MultiTaskLoss: model outputs lack task {name!r} (got {sorted(outputs)})")
            parts.append(loss(outputs[name], batch).float().reshape(1))
        losses = parts[0] if len(parts) == 1 else torch.cat(parts)
        return losses if self._order is None else losses[self._order]

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}"


class _FunctionLoss(nn.Module):
    """A plain ``loss(output, batch)`` function held where modules are (moved with ``.to`` as a no-op)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, output: Tensor, batch) -> Tensor:
        return self.fn(output, batch)
