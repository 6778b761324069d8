"""PAD-Net (Xu et al., CVPR 2018, "PAD-Net: Multi-Tasks Guided Prediction-and-Distillation Network"),
the decoder-side family MTI-Net and InvPT build on.

The shared levels (neck, or backbone without one) are upsampled to the finest one and concatenated; per
dense task a small trunk (1x1 and 3x3 conv-BN-ReLU) makes task features ``F_t`` at that stride, from
which the task's *initial* prediction comes (its configured head, a copy, on ``[F_t]``). Multi-modal
distillation then gives each task the other tasks' features through learned spatial attention,
``F'_t = F_t + Σ_{s≠t} sigmoid(a_{s→t}(F_s)) ⊙ f_{s→t}(F_s)`` (3x3 convs, PAD-Net's attention-guided
distillation as MTI-Net's code writes it), and the final prediction is the task's head on ``[F'_t]``.

The initial predictions are deep-supervised: in training the model also returns them as
``"<task>/initial"`` and the task's loss is its loss on both (weight 1 each, as PAD-Net). Detection does
not take part in the distillation (its head decodes boxes from the multi-level features, not a map): its
head reads the shared levels directly, as in the hard-sharing model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...registry import ARCHS
from ...tasks.outputs import initial_output_key
from ..multitask import MultiTaskModel
from .base import ModelParts, is_dense_head

__all__ = ["PADNetModel", "SpatialAttention"]


def _conv_bn_relu(in_channels: int, channels: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, channels, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]


class SpatialAttention(nn.Module):
    """``forward(x [B,C,H,W]) -> sigmoid(conv_a(x)) * conv_f(x)`` (3x3 convs, ``C`` channels out)."""

    def __init__(self, channels: int):
        super().__init__()
        self.mask = nn.Conv2d(channels, channels, 3, padding=1)
        self.features = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.mask(x)) * self.features(x)


class PADNetModel(MultiTaskModel):
    """Shared backbone and neck, per dense task a trunk, an initial head, the distillation into it and a
    final head; other tasks (detection) a head on the shared levels.

    Parameters more than one task's loss depends on (shared, what the gradient methods combine):
    backbone, neck, and every trunk (each task's features feed the others' distillation). Task t's own:
    its initial head, the attention modules into it and its final head. The representation-level methods
    measure at the shared levels (when a task reads them directly) and the trunks' features ``F_t``.

    Args:
        backbone, neck: as :class:`~mtvision.models.MultiTaskModel`.
        trunks: dense task -> module from the concatenated levels to ``F_t``.
        initial_heads: dense task -> head on ``[F_t]``.
        distillation: dense task t -> {other dense task s -> :class:`SpatialAttention`}.
        heads: every task -> final head (dense: on ``[F'_t]``; others: on the shared levels).
    """

    def __init__(self, backbone: nn.Module, neck: Optional[nn.Module], trunks: dict[str, nn.Module],
                 initial_heads: dict[str, nn.Module], distillation: dict[str, dict[str, nn.Module]],
                 heads: dict[str, nn.Module]):
        super().__init__(backbone, neck, heads)
        self.trunks = nn.ModuleDict(trunks)
        self.initial_heads = nn.ModuleDict(initial_heads)
        self.distillation = nn.ModuleDict({t: nn.ModuleDict(d) for t, d in distillation.items()})
        self.distilled = list(self.trunks.keys())
        # the shared levels go to the heads only when a task reads them (detection)
        self._levels_to_heads = any(t not in self.trunks for t in self.heads)

    def forward_features(self, images: Tensor) -> list[Tensor]:
        """``[*shared levels (when detection reads them), *F_t per dense task]``."""
        levels = super().forward_features(images)
        size = levels[0].shape[-2:]
        fused = torch.cat([levels[0], *(F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                                        for f in levels[1:])], 1)
        task_features = [self.trunks[t](fused) for t in self.distilled]
        return [*(levels if self._levels_to_heads else []), *task_features]

    def forward_heads(self, features: Sequence[Tensor], image_size: Sequence[int]) -> dict[str, Tensor]:
        k = len(features) - len(self.distilled)
        levels, task_features = list(features[:k]), dict(zip(self.distilled, features[k:]))
        out, initial = {}, {}
        for t, head in self.heads.items():
            if t not in task_features:
                out[t] = head(levels, image_size)
                continue
            f = task_features[t]
            initial[initial_output_key(t)] = self.initial_heads[t]([f], image_size)
            for s, attend in self.distillation[t].items():
                f = f + attend(task_features[s])
            out[t] = head([f], image_size)
        if self.training:
            out.update(initial)
        return out

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Every task's final prediction; in training also each dense task's initial one
        (``"<task>/initial"``)."""
        return super().forward(images)

    def compile_parts(self) -> list[nn.Module]:
        attention = [a for into in self.distillation.values() for a in into.values()]
        return [*super().compile_parts(), *self.trunks.values(), *self.initial_heads.values(), *attention]

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from super().shared_parameters()
        yield from self.trunks.parameters()

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The trunks (the last layers every dense task depends on)."""
        return list(self.trunks.parameters())

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from super().task_parameters(task)
        if task in self.trunks:
            yield from self.initial_heads[task].parameters()
            yield from self.distillation[task].parameters()


@ARCHS.register("padnet")
def build_padnet(parts: ModelParts, channels: int = 64) -> PADNetModel:
    """``model.arch: {name: padnet, channels: 64}`` (the width of the task features ``F_t``)."""
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    backbone = parts.backbone()
    neck = parts.neck(backbone)
    level_channels, strides = parts.levels_of(backbone, neck)
    dense = [t for t in parts.tasks if is_dense_head(parts.head_classes[t])]
    heads = {t: parts.head(t, level_channels, strides) for t in parts.tasks if t not in dense}
    trunks, initial_heads, distillation = {}, {}, {}
    for t in dense:
        trunks[t] = nn.Sequential(*_conv_bn_relu(sum(level_channels), channels, 1),
                                  *_conv_bn_relu(channels, channels, 3))
        initial_heads[t] = parts.head(t, [channels], strides[:1])
        heads[t] = parts.head(t, [channels], strides[:1])
        distillation[t] = {s: SpatialAttention(channels) for s in dense if s != t}
    heads = {t: heads[t] for t in parts.tasks}  # in the config's task order
    return PADNetModel(backbone, neck, trunks, initial_heads, distillation, heads)
