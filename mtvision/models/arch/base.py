"""What every multi-task architecture gives the trainer, and the base of those with a network per task.

An architecture is an ``nn.Module`` with (:class:`~mtvision.models.MultiTaskModel`, ``hps``, is one):

- ``forward(images [B,3,H,W]) -> {task: prediction}`` (in training, also ``"<task>/initial"`` for
  deep-supervised intermediate predictions, :mod:`mtvision.tasks.outputs`);
- ``forward_features(images) -> list[Tensor]`` and ``forward_heads(features, image_size) -> dict``, whose
  composition is ``forward``: the split the representation-level gradient methods (``balancer.level:
  rep``) measure at. With ``rep_level = True`` ``forward_features`` uses shared parameters only and
  everything after it is task-specific; an architecture without a representation every task reads has
  ``rep_level = False`` (the rep level is refused);
- ``shared_parameters()`` (the parameters more than one task's loss depends on: what the gradient
  methods combine the per-task gradients of) and ``task_parameters(task)`` (those only ``task``'s loss
  depends on); together they are every parameter, each once; ``last_shared_parameters()`` (GradNorm);
- ``heads`` (a ``ModuleDict`` of each task's final head: detection decoding reads it), ``tasks``,
  ``patch_size`` (inputs must be multiples of it), ``compile_parts()`` (the modules ``train.compile``
  compiles one by one), and optionally ``add_penalty_grad(scale) -> float``:
  a regulariser outside the task losses (soft sharing's), whose gradient the trainer adds after the
  balanced backward.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Optional

from torch import Tensor, nn

from ..parts import ModelParts, last_stage_parameters

__all__ = ["ModelParts", "TaskNetworks", "is_dense_head", "last_stage_parameters"]


def is_dense_head(head: Any) -> bool:
    """Whether a head (module or class) predicts a map at the image size (a detection head decodes boxes:
    ``predict``)."""
    return not callable(getattr(head, "predict", None))


class TaskNetworks(nn.Module):
    """Base of the architectures with per-task networks (soft sharing, cross-stitch): per task a backbone,
    a neck (or none) and a head; ``forward_features`` gives every task's levels, concatenated in task
    order, and ``forward_heads`` runs each task's neck and head on its own."""

    rep_level = False

    def __init__(self, backbones: dict[str, nn.Module], necks: dict[str, Optional[nn.Module]],
                 heads: dict[str, nn.Module]):
        super().__init__()
        self.backbones = nn.ModuleDict(backbones)
        self.necks = nn.ModuleDict({t: n if n is not None else nn.Identity() for t, n in necks.items()})
        self.heads = nn.ModuleDict(heads)
        self._num_levels = len(next(iter(backbones.values())).strides)

    @property
    def tasks(self) -> list[str]:
        return list(self.heads.keys())

    @property
    def patch_size(self) -> int:
        return int(getattr(next(iter(self.backbones.values())), "patch_size", 1) or 1)

    def task_levels(self, images: Tensor) -> list[list[Tensor]]:
        """Per task, its backbone's levels."""
        raise NotImplementedError

    def forward_features(self, images: Tensor) -> list[Tensor]:
        if images.dim() != 4:
            raise ValueError(f"images must be [B,3,H,W], got shape {tuple(images.shape)}")
        return [f for levels in self.task_levels(images) for f in levels]

    def forward_heads(self, features: Sequence[Tensor], image_size: Sequence[int]) -> dict[str, Tensor]:
        n = self._num_levels
        return {t: self.heads[t](list(self.necks[t](list(features[i * n:(i + 1) * n]))), image_size)
                for i, t in enumerate(self.tasks)}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.forward_heads(self.forward_features(images), images.shape[-2:])

    def compile_parts(self) -> list[nn.Module]:
        necks = [n for n in self.necks.values() if not isinstance(n, nn.Identity)]
        return [*self.backbones.values(), *necks, *self.heads.values()]

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        if task not in self.heads:
            raise KeyError(f"unknown task {task!r} (model tasks: {', '.join(self.heads)})")
        return self._task_parameters(task)

    def _task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.heads[task].parameters()
