"""The part factories an architecture is built from, and the backbone-stage lookup GradNorm's "last shared
layer" uses (shared by every architecture)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from torch import nn

__all__ = ["ModelParts", "last_stage_parameters"]


@dataclass
class ModelParts:
    """Builds fresh copies of the configured parts (each call a new module with its own weights).

    ``backbone()``; ``neck(backbone)`` (``None`` when the config has no neck); ``head(task, in_channels,
    strides)``: the task's configured head for levels of those channels and strides; ``tasks``: the
    configured tasks, in order; ``head_classes``: task -> the class (or builder) its head is built by.
    """

    backbone: Callable[[], nn.Module]
    neck: Callable[[nn.Module], Optional[nn.Module]]
    head: Callable[[str, Union[int, Sequence[int]], Sequence[int]], nn.Module]
    tasks: list[str]
    head_classes: dict[str, Any]

    def levels_of(self, backbone: nn.Module, neck: Optional[nn.Module]) -> tuple[list[int], list[int]]:
        """``(channels, strides)`` of the levels the heads take: the neck's, else the backbone's."""
        part = backbone if neck is None else neck
        channels = part.out_channels
        channels = [channels] * len(part.strides) if isinstance(channels, int) else list(channels)
        return channels, list(part.strides)


def last_stage_parameters(backbone: nn.Module) -> list[nn.Parameter]:
    """A backbone's last stage's parameters: a ViT's last transformer block, else the last child module
    with parameters of its timm body (e.g. ``layer4`` of a ResNet)."""
    vit = getattr(backbone, "vit", None)
    if vit is not None and len(getattr(vit, "blocks", ())):
        return list(vit.blocks[-1].parameters())
    module = getattr(backbone, "body", backbone)
    for child in reversed(list(module.children())):
        params = list(child.parameters())
        if params:
            return params
    return list(backbone.parameters())
