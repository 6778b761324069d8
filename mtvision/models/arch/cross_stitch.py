"""Cross-stitch networks (Misra et al., CVPR 2016, "Cross-stitch Networks for Multi-task Learning").

One backbone per task, run stage by stage in lockstep; after every stage a cross-stitch unit replaces
each task's stream by a learned linear combination of all the tasks' streams, per channel:
``x'_t[c] = Σ_s α[t, s, c] x_s[c]``. The paper initialises α near identity, ``α_S = 0.9`` for a task's
own stream and ``α_D = 0.1`` for the other one; with T tasks the other streams share ``1 − α_S`` equally
(each row sums to 1, keeping the streams' scale).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from ...registry import ARCHS
from ..backbones import BackboneError
from .base import ModelParts, TaskNetworks

__all__ = ["CrossStitchModel", "CrossStitchUnit"]


class CrossStitchUnit(nn.Module):
    """``forward(streams: T tensors of one shape) -> T tensors``: ``out_t = Σ_s α[t, s, c] * x_s`` per
    channel ``c`` (on dimension ``channel_dim``); ``α`` (``weight``, ``[T, T, C]``) starts at
    ``self_weight`` on the diagonal and ``(1 − self_weight) / (T − 1)`` elsewhere."""

    def __init__(self, num_tasks: int, channels: int, self_weight: float = 0.9, channel_dim: int = 1):
        super().__init__()
        T = int(num_tasks)
        other = (1.0 - self_weight) / (T - 1) if T > 1 else 0.0
        alpha = torch.full((T, T), other)
        alpha.fill_diagonal_(self_weight if T > 1 else 1.0)
        self.weight = nn.Parameter(alpha[:, :, None].repeat(1, 1, int(channels)))
        self.channel_dim = channel_dim

    def forward(self, streams: Sequence[Tensor]) -> list[Tensor]:
        x = streams[0]
        # α[t, s] broadcast along the channel dimension; T^2 multiply-adds without a [T, S, ...] temporary
        shape = [1] * x.dim()
        shape[self.channel_dim] = x.shape[self.channel_dim]
        w = self.weight.to(x.dtype)
        out = []
        for t in range(w.shape[0]):
            mixed = w[t, 0].view(shape) * streams[0]
            for s in range(1, w.shape[1]):
                mixed = mixed + w[t, s].view(shape) * streams[s]
            out.append(mixed)
        return out

    def extra_repr(self) -> str:
        T, _, C = self.weight.shape
        return f"tasks={T}, channels={C}, channel_dim={self.channel_dim}"


class CrossStitchModel(TaskNetworks):
    """Per task a backbone (one architecture, copied), its neck (or none) and head; the backbones run
    stage by stage and a :class:`CrossStitchUnit` mixes the task streams after every stage (every timm
    feature level of a CNN, the stride-2 stem included; every transformer block of a ViT).

    Every task depends on every backbone through the units, so the shared parameters (what the gradient
    methods combine) are all the backbones and the units; task parameters are each task's neck and head.
    Each task's head reads its own stream, so ``balancer.level: rep`` is refused. With ``self_weight=1``
    the units are identities and the model is T independent networks.

    Backbones: those that run stage by stage (``num_stages`` / ``run_stage`` / ``levels_from_stages``):
    timm CNNs whose feature extractor is a module sequence (ResNet, ConvNeXt, RegNet, Swin, ...) and
    plain VisionTransformers.
    """

    def __init__(self, backbones: dict[str, nn.Module], necks: dict[str, Optional[nn.Module]],
                 heads: dict[str, nn.Module], self_weight: float = 0.9):
        super().__init__(backbones, necks, heads)
        if isinstance(self_weight, bool) or not isinstance(self_weight, (int, float)) \
                or not 0 <= self_weight <= 1:
            raise ValueError(f"self_weight must be a number in [0, 1], got {self_weight!r}")
        first = next(iter(self.backbones.values()))
        n = first.num_stages  # BackboneError when the backbone cannot run stage by stage
        self.stitches = nn.ModuleList(
            CrossStitchUnit(len(self.tasks), c, float(self_weight), first.stage_channel_dim)
            for c in first.stage_channels[:n])

    def task_levels(self, images: Tensor) -> list[list[Tensor]]:
        backbones = [self.backbones[t] for t in self.tasks]
        streams = [images] * len(backbones)
        states: list[list[Tensor]] = [[] for _ in backbones]
        for i, stitch in enumerate(self.stitches):
            streams = stitch([b.run_stage(i, x) for b, x in zip(backbones, streams)])
            for kept, x in zip(states, streams):
                kept.append(x)
        return [b.levels_from_stages(s, images.shape[-2:]) for b, s in zip(backbones, states)]

    def compile_parts(self) -> list[nn.Module]:
        """The necks and heads. The backbones run stage by stage, and their stages (and the units)
        share one code object per class over many shapes: compiled one by one they recompile until torch
        turns the shapes dynamic, whose backward Inductor failed to build (torch 2.14, CPU); they run
        eagerly."""
        necks = [n for n in self.necks.values() if not isinstance(n, nn.Identity)]
        return [*necks, *self.heads.values()]

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.backbones.parameters()
        yield from self.stitches.parameters()

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The last cross-stitch unit's α and every backbone's last stage."""
        last = len(self.stitches) - 1
        out = list(self.stitches[last].parameters())
        for b in self.backbones.values():
            out += [p for m in b.stage_modules(last) for p in m.parameters()]
        return out

    def _task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.necks[task].parameters()
        yield from self.heads[task].parameters()


@ARCHS.register("cross_stitch")
def build_cross_stitch(parts: ModelParts, self_weight: float = 0.9) -> CrossStitchModel:
    """``model.arch: {name: cross_stitch, self_weight: 0.9}`` (the units' initial α on a task's own
    stream)."""
    backbones, necks, heads = {}, {}, {}
    for t in parts.tasks:
        backbones[t] = parts.backbone()
        if not hasattr(backbones[t], "run_stage"):
            raise BackboneError("name", f"cross_stitch runs the backbone stage by stage; "
                                        f"{type(backbones[t]).__name__} cannot")
        necks[t] = parts.neck(backbones[t])
        heads[t] = parts.head(t, *parts.levels_of(backbones[t], necks[t]))
    return CrossStitchModel(backbones, necks, heads, self_weight=self_weight)
