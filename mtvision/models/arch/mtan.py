"""MTAN: the shared network plus per-task attention over its levels (Liu et al., CVPR 2019, "End-to-End
Multi-Task Learning with Attention").

Each task has, per level of the shared features (finest first), a soft attention mask
``a_t^j = sigmoid(g_t^j([L_j, p_t^{j-1}]))`` applied to the shared level, ``A_t^j = a_t^j ⊙ L_j``, and
a conv that carries the task's path on to the next level, ``p_t^j = pool(f_t^j(A_t^j))``, so each task's
attention at one level sees what it attended to at the previous one. ``g`` is MTAN's attention block
(1x1 conv-BN-ReLU, 1x1 conv-BN, sigmoid) and ``f`` its 3x3 conv-BN-ReLU; pooling is a max-pool by the
stride ratio (none between levels of one stride, as in a dilated backbone), rounding up. Task t's head takes
``[A_t^1, ..., A_t^n]``; with all-ones masks that is the shared features, i.e. the hard-sharing model.

Where MTAN attends to the inner layers of each ResNet block and shares ``f`` between tasks, this works
on the levels any backbone (and neck) returns and gives each task its own ``f``: everything after the
shared features is then task-specific, which is what the representation-level gradient methods need.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...registry import ARCHS
from ..multitask import MultiTaskModel
from ..parts import ModelParts

__all__ = ["MTANModel", "TaskAttention"]


def _attention_mask(in_channels: int, channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels), nn.Sigmoid())


def _path_conv(in_channels: int, channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                         nn.ReLU(inplace=True))


class TaskAttention(nn.Module):
    """One task's attention modules over levels of ``channels`` and ``strides`` (finest first):
    ``forward(levels) -> attended levels`` (same shapes)."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int]):
        super().__init__()
        channels, strides = [int(c) for c in channels], [int(s) for s in strides]
        self.masks = nn.ModuleList(
            _attention_mask(c + (channels[j - 1] if j else 0), c) for j, c in enumerate(channels))
        # the path from level j to j+1: f maps level j's attended map to level j+1's width
        self.paths = nn.ModuleList(_path_conv(channels[j], channels[j + 1]) for j in range(len(channels) - 1))
        self.pool = [max(1, strides[j + 1] // strides[j]) for j in range(len(strides) - 1)]

    def forward(self, levels: Sequence[Tensor]) -> list[Tensor]:
        out, path = [], None
        for j, (level, mask) in enumerate(zip(levels, self.masks)):
            if path is not None:  # a level pooled from an odd size may be a row/column smaller (floor)
                path = path[..., :level.shape[-2], :level.shape[-1]]
            attended = mask(level if path is None else torch.cat([level, path], 1)) * level
            out.append(attended)
            if j < len(self.paths):
                path = self.paths[j](attended)
                k = self.pool[j]
                if k > 1:
                    path = F.max_pool2d(path, k, k, ceil_mode=True)
        return out


class MTANModel(MultiTaskModel):
    """The shared backbone (and neck), per task a :class:`TaskAttention` over the shared levels, and per
    task a head on its attended levels. Shared parameters: backbone and neck; task parameters: the task's
    attention and head. The representation-level methods measure at the shared levels.

    Args:
        backbone, neck: as :class:`~mtvision.models.MultiTaskModel` (``neck`` ``None``: the backbone's
            levels are the shared features).
        attention: task -> :class:`TaskAttention`; heads: task -> head (same keys).
    """

    def __init__(self, backbone: nn.Module, neck: Optional[nn.Module], attention: dict[str, nn.Module],
                 heads: dict[str, nn.Module]):
        super().__init__(backbone, neck, heads)
        self.attention = nn.ModuleDict(attention)

    def forward_heads(self, features: Sequence[Tensor], image_size: Sequence[int]) -> dict[str, Tensor]:
        return {t: head(self.attention[t](features), image_size) for t, head in self.heads.items()}

    def compile_parts(self) -> list[nn.Module]:
        return [*super().compile_parts(), *self.attention.values()]

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from super().task_parameters(task)
        yield from self.attention[task].parameters()


@ARCHS.register("mtan")
def build_mtan(parts: ModelParts) -> MTANModel:
    """``model.arch: {name: mtan}``."""
    backbone = parts.backbone()
    neck = parts.neck(backbone)
    channels, strides = parts.levels_of(backbone, neck)
    attention = {t: TaskAttention(channels, strides) for t in parts.tasks}
    heads = {t: parts.head(t, channels, strides) for t in parts.tasks}
    return MTANModel(backbone, neck, attention, heads)
