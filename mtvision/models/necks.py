"""Necks: turn the backbone's multi-scale maps into same-width levels for the task heads."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from typing import Optional

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork

from ..registry import NECKS

__all__ = ["FPNNeck", "group_norm_groups"]


def group_norm_groups(channels: int, max_groups: int = 32) -> int:
    """Largest group count <= ``max_groups`` that divides ``channels`` (GroupNorm needs a divisor)."""
    return math.gcd(channels, max_groups)


@NECKS.register("fpn")
class FPNNeck(nn.Module):
    """Feature pyramid network (Lin et al. 2017) over the backbone levels, via
    ``torchvision.ops.FeaturePyramidNetwork`` (1x1 lateral convs, nearest top-down upsampling, 3x3 output
    convs; no extra levels).

    ``forward(features: list of [B, in_channels[i], H_i, W_i]) -> list of [B, out_channels, H_i, W_i]``,
    finest first, same sizes and ``strides`` as the input (4, 8, 16, 32 for the built-in backbones), so
    a detection head can use the levels as they are.

    Args:
        in_channels: channels of each backbone level (``backbone.out_channels``).
        out_channels: channels of every output level.
        strides: stride of each level (``backbone.strides``); default ``4, 8, 16, ...``.
        norm: ``None`` (plain FPN, convs with bias) or ``"gn"`` (GroupNorm after each conv).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 128, strides: Optional[Sequence[int]] = None,
                 norm: Optional[str] = None):
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if not in_channels or any(c <= 0 for c in in_channels):
            raise ValueError(f"in_channels must be a non-empty list of positive ints, got {in_channels}")
        if not isinstance(out_channels, int) or isinstance(out_channels, bool) or out_channels <= 0:
            raise ValueError(f"out_channels must be a positive int, got {out_channels!r}")
        if strides is None:
            strides = [4 * 2**i for i in range(len(in_channels))]
        strides = [int(s) for s in strides]
        if len(strides) != len(in_channels):
            raise ValueError(f"strides {strides} and in_channels {in_channels} differ in length")
        if norm not in (None, "gn"):
            raise ValueError(f"norm must be null or 'gn', got {norm!r}")
        norm_layer = partial(nn.GroupNorm, group_norm_groups(out_channels)) if norm == "gn" else None
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, norm_layer=norm_layer)
        self.in_channels: list[int] = in_channels
        self.out_channels: int = out_channels
        self.strides: list[int] = strides

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        if len(features) != len(self.in_channels):
            raise ValueError(f"FPNNeck expects {len(self.in_channels)} levels, got {len(features)}")
        out = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))
        return list(out.values())
