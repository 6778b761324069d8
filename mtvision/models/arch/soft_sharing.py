"""Soft parameter sharing: one network per task, kept close by an L2 penalty between the task copies.

Duong et al. 2015 ("Low Resource Dependency Parsing: Cross-lingual Parameter Sharing in a Neural Network
Parser") and Yang & Hospedales 2017: the part hard sharing shares (backbone and neck) is copied per task,
and ``λ Σ_{i<j} ||θ_i − θ_j||²`` over every pair of task copies joins the training objective.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
from torch import Tensor, nn

from ...registry import ARCHS
from .base import ModelParts, TaskNetworks, last_stage_parameters

__all__ = ["SoftSharingModel"]


class SoftSharingModel(TaskNetworks):
    """Per task a backbone, neck and head; ``penalty()`` = ``weight * Σ_{i<j} ||θ_i − θ_j||²`` over the
    task copies of every backbone and neck parameter.

    For the gradient methods the "shared" parameters are every task's backbone and neck (each task's
    gradient is zero on the other tasks' copies, so the tasks' gradients are orthogonal and the methods
    balance their magnitudes); task parameters are the heads. There is no representation all tasks read,
    so ``balancer.level: rep`` is refused. The penalty is a regulariser outside the task losses: its
    gradient is added after the balanced backward (:meth:`add_penalty_grad`), unweighted by the method.

    Args:
        backbones, necks, heads: per task (same keys, same order); the backbones and the necks are copies
            of one architecture.
        weight: ``λ`` (>= 0).
    """

    def __init__(self, backbones: dict[str, nn.Module], necks: dict[str, Optional[nn.Module]],
                 heads: dict[str, nn.Module], weight: float = 1e-3):
        super().__init__(backbones, necks, heads)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight >= 0:
            raise ValueError(f"weight must be a number >= 0, got {weight!r}")
        self.weight = float(weight)
        shapes = [[p.shape for p in self._copy_parameters(t)] for t in self.tasks]
        if any(s != shapes[0] for s in shapes):
            raise ValueError("soft sharing needs the same backbone and neck for every task")

    def task_levels(self, images: Tensor) -> list[list[Tensor]]:
        return [list(self.backbones[t](images)) for t in self.tasks]

    def _copy_parameters(self, task: str) -> list[nn.Parameter]:
        return [*self.backbones[task].parameters(), *self.necks[task].parameters()]

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        for t in self.tasks:
            yield from self._copy_parameters(t)

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """Every task's neck, or without necks the last parameterised stage of every task's backbone."""
        out = []
        for t in self.tasks:
            params = list(self.necks[t].parameters())
            out += params if params else last_stage_parameters(self.backbones[t])
        return out

    def _copy_groups(self) -> list[list[nn.Parameter]]:
        """Per backbone/neck parameter, its T task copies (trainable ones)."""
        groups = list(zip(*(self._copy_parameters(t) for t in self.tasks)))
        return [list(g) for g in groups if all(p.requires_grad for p in g)]

    def penalty(self) -> Tensor:
        """``weight * Σ_{i<j} ||θ_i − θ_j||²`` (differentiable), computed as ``weight * T Σ_i ||θ_i − θ̄||²``
        (the same sum; no cancellation when the copies are close)."""
        T = len(self.tasks)
        total = None
        for group in self._copy_groups():
            stacked = torch.stack(group)
            term = (stacked - stacked.mean(0)).square().sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return self.weight * T * total

    @torch.no_grad()
    def add_penalty_grad(self, scale: float = 1.0) -> float:
        """Adds ``scale *`` the penalty's gradient, ``2 weight T (θ_i − θ̄)``, to every copy's ``.grad``
        (``scale``: the fp16 loss scale the other gradients carry); returns the penalty's value."""
        groups = self._copy_groups()
        if not groups or self.weight == 0 or len(self.tasks) < 2:
            return 0.0
        T = len(self.tasks)
        copies = [list(c) for c in zip(*groups)]  # [task][parameter]
        mean = torch._foreach_add(copies[0], copies[1])
        for c in copies[2:]:
            torch._foreach_add_(mean, c)
        torch._foreach_div_(mean, float(T))
        squares = []
        for c in copies:
            for p in c:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            diff = torch._foreach_sub(c, mean)
            squares += [n * n for n in torch._foreach_norm(diff)]
            torch._foreach_add_([p.grad for p in c], diff, alpha=2.0 * self.weight * T * scale)
        return float(self.weight * T * torch.stack(squares).sum())


@ARCHS.register("soft_sharing")
def build_soft_sharing(parts: ModelParts, weight: float = 1e-3) -> SoftSharingModel:
    """``model.arch: {name: soft_sharing, weight: λ}``."""
    backbones, necks, heads = {}, {}, {}
    for t in parts.tasks:
        backbones[t] = parts.backbone()
        necks[t] = parts.neck(backbones[t])
        heads[t] = parts.head(t, *parts.levels_of(backbones[t], necks[t]))
    return SoftSharingModel(backbones, necks, heads, weight=weight)
