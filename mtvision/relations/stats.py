"""Running summaries of the task relations over a training run: gradient conflicts (from per-task
Gramians) and lookahead affinities (from :class:`~mtvision.relations.probe.ProbeResult`), kept as plain
data so that they go into checkpoints and ``metrics.json``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["TaskRelations", "cosine_from_gram"]


def cosine_from_gram(gram: Tensor) -> Tensor:
    """``[T,T]`` cosine similarities ``G_ij / sqrt(G_ii G_jj)`` of the gradients whose Gramian is ``gram``;
    a zero gradient has cosine 0 with every other (and 1 with itself)."""
    gram = gram.double()
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram))
    cos = cos.clamp(-1.0, 1.0)
    cos.fill_diagonal_(1.0)
    return cos


def _matrix(x) -> list[list[float]]:
    return [[float(v) for v in row] for row in x]


class TaskRelations:
    """Accumulates, for tasks ``tasks``:

    - gradient measurements (a Gramian of the per-task gradients of the shared parameters each): the mean
      cosine similarity per pair, the fraction of measurements where a pair conflicts (cosine < 0), the
      mean gradient norm per task;
    - affinity measurements: the mean lookahead affinity ``Z[i, j]`` (TAG averages it over training).
    """

    def __init__(self, tasks: Sequence[str]):
        self.tasks = list(tasks)
        T = len(self.tasks)
        self.gradient_steps = 0
        self.cosine_sum = torch.zeros(T, T, dtype=torch.float64)
        self.conflicts = torch.zeros(T, T, dtype=torch.float64)
        self.norm_sum = torch.zeros(T, dtype=torch.float64)
        self.affinity_steps = 0
        self.affinity_sum = torch.zeros(T, T, dtype=torch.float64)
        self.last_cosine: Tensor | None = None
        self.last_affinity: Tensor | None = None

    def add_gram(self, gram: Tensor) -> bool:
        """Count one Gramian ``[T,T]`` (host); a non-finite one is ignored (returns False)."""
        gram = gram.detach().double().cpu()
        if not bool(torch.isfinite(gram).all()):
            return False
        cos = cosine_from_gram(gram)
        self.gradient_steps += 1
        self.cosine_sum += cos
        self.conflicts += (cos < 0).double()
        self.norm_sum += gram.diagonal().clamp_min(0).sqrt()
        self.last_cosine = cos
        return True

    def add_affinity(self, affinity: Tensor) -> bool:
        """Count one lookahead affinity ``[T,T]``; a non-finite one is ignored (returns False)."""
        affinity = affinity.detach().double().cpu()
        if not bool(torch.isfinite(affinity).all()):
            return False
        self.affinity_steps += 1
        self.affinity_sum += affinity
        self.last_affinity = affinity
        return True

    @property
    def mean_cosine(self) -> Tensor:
        return self.cosine_sum / max(self.gradient_steps, 1)

    @property
    def conflict_fraction(self) -> Tensor:
        return self.conflicts / max(self.gradient_steps, 1)

    @property
    def mean_affinity(self) -> Tensor:
        return self.affinity_sum / max(self.affinity_steps, 1)

    def summary(self) -> dict[str, Any]:
        """Plain data for ``metrics.json``: ``tasks``, and when measured ``gradients`` (``steps``,
        ``mean_cosine`` and ``conflict_fraction`` T x T, ``mean_norm`` per task) and ``affinity``
        (``steps``, ``mean`` T x T, row = the task whose step is taken)."""
        out: dict[str, Any] = {"tasks": self.tasks}
        if self.gradient_steps:
            out["gradients"] = {
                "steps": self.gradient_steps, "mean_cosine": _matrix(self.mean_cosine),
                "conflict_fraction": _matrix(self.conflict_fraction),
                "mean_norm": {t: float(v) for t, v in zip(self.tasks, self.norm_sum / self.gradient_steps)}}
        if self.affinity_steps:
            out["affinity"] = {"steps": self.affinity_steps, "mean": _matrix(self.mean_affinity)}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "gradient_steps": self.gradient_steps, "cosine_sum": self.cosine_sum,
                "conflicts": self.conflicts, "norm_sum": self.norm_sum, "affinity_steps": self.affinity_steps,
                "affinity_sum": self.affinity_sum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if list(state["tasks"]) != self.tasks:
            raise ValueError(f"task relations of tasks {list(state['tasks'])} cannot continue for "
                             f"{self.tasks}")
        self.gradient_steps = int(state["gradient_steps"])
        self.affinity_steps = int(state["affinity_steps"])
        for key in ("cosine_sum", "conflicts", "norm_sum", "affinity_sum"):
            setattr(self, key, state[key].detach().double().cpu().clone())
