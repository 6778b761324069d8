"""The training loss of any mix of tasks: the fused dense tasks in one op call, every other task through
its own loss module (``Task.build_loss``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from ..tasks import Task
from ..tasks.outputs import initial_output_key
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
        """Float32 ``[T]`` in ``tasks`` order. A task whose deep-supervised intermediate prediction is in
        ``outputs`` (``"<task>/initial"``, :mod:`mtvision.tasks.outputs`) adds its loss on it to its own."""
        losses = self._losses(outputs, batch)
        initial = {n: outputs[initial_output_key(n)] for n in self.tasks if initial_output_key(n) in outputs}
        if not initial:
            return losses
        fused = [] if self.dense is None else self.dense.tasks
        if fused and 0 < sum(n in initial for n in fused) < len(fused):
            raise ValueError(f"MultiTaskLoss: intermediate predictions for {sorted(initial)} cover some of "
                             f"the fused dense tasks {fused}, not all")
        on_initial = self._losses({**outputs, **initial}, batch, only=set(initial))
        mask = torch.tensor([n in initial for n in self.tasks], device=losses.device)
        return losses + torch.where(mask, on_initial, torch.zeros_like(on_initial))

    def _losses(self, outputs: Mapping[str, Tensor], batch: Mapping[str, object],
                only: Optional[set] = None) -> Tensor:
        """``[T]`` losses; with ``only``, the own-loss tasks not in it are 0 (not computed)."""
        parts = []
        if self.dense is not None and (only is None or self.dense.tasks[0] in only):
            parts.append(self.dense.task_losses(outputs, batch))
        elif self.dense is not None:
            parts.append(torch.zeros(len(self.dense.tasks), device=_device_of(outputs)))
        for name, loss in self.own.items():
            if name not in outputs:
                raise KeyError(f"MultiTaskLoss: model outputs lack task {name!r} (got {sorted(outputs)})")
            if only is None or name in only:
                parts.append(loss(outputs[name], batch).float().reshape(1))
            else:
                parts.append(torch.zeros(1, device=outputs[name].device))
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


def _device_of(outputs: Mapping[str, Tensor]) -> torch.device:
    return next(iter(outputs.values())).device
