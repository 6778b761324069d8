"""Per-task gradients of a set of parameters as the rows of one flat ``[T, P]`` tensor (the task-relation
monitor's measurements)."""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Optional

import torch
from torch import Tensor

from ..tasks.outputs import as_output_lists

__all__ = ["flat_task_gradients"]


def flat_task_gradients(losses: Tensor, params: Sequence[Tensor], rows: Tensor, scale: float = 1.0,
                        outputs: Optional[Sequence[Sequence[Tensor]]] = None, skip: Container[int] = (),
                        keep_graph: bool = False) -> Tensor:
    """``rows[t]`` := the gradient of ``scale * losses[t]`` w.r.t. ``params``, flattened in order, for every
    task t not in ``skip`` (0 where a parameter is not reached); returns ``rows`` (``[T, P]``).

    ``outputs``: each task's outputs (:func:`~mtvision.tasks.outputs.task_output_tensors`), when task t's
    loss depends on ``outputs[t]`` only: one backward of the summed losses to the outputs (a fused loss
    computes every task's at once), then each task's pass starts from its own outputs and never walks the other heads with zero gradients. ``keep_graph``: keep
    the graph after the last pass (the caller backpropagates through it again)."""
    T = losses.numel()
    todo = [t for t in range(T) if t not in skip]
    sizes = [p.numel() for p in params]
    output_grads = None
    if outputs is not None and todo:
        outputs = as_output_lists(outputs)
        flat = [o for outs in outputs for o in outs]
        flat_grads = iter(torch.autograd.grad(losses.sum() * scale, flat, retain_graph=True,
                                              allow_unused=True))
        output_grads = [[next(flat_grads) for _ in outs] for outs in outputs]
    for n, t in enumerate(todo):
        retain = keep_graph or n < len(todo) - 1
        if output_grads is not None:
            reached = [(o, g) for o, g in zip(outputs[t], output_grads[t]) if g is not None]
            if not reached:
                rows[t].zero_()
                continue
            grads = torch.autograd.grad([o for o, _ in reached], list(params),
                                        grad_outputs=[g for _, g in reached],
                                        retain_graph=retain, allow_unused=True)
        else:
            grads = torch.autograd.grad(losses[t] * scale, list(params), retain_graph=retain,
                                        allow_unused=True)
        for chunk, g in zip(torch.split(rows[t], sizes), grads):
            if g is None:  # a parameter this task does not reach
                chunk.zero_()
            else:
                chunk.copy_(g.reshape(-1))
    return rows
