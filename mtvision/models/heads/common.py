"""The dense decoder shared by the segmentation, depth and normal heads.

Semantic-FPN style (Kirillov et al. 2019, "Panoptic Feature Pyramid Networks"): each level goes through
``log2(stride / finest_stride)`` blocks of conv3x3-GroupNorm-ReLU + 2x bilinear upsampling (one block and
no upsampling for the finest level), the results are summed at the finest stride (4 for the built-in
backbones), and a 1x1 conv predicts the output channels. Every head owns its own decoder weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch.nn.functional as F
from torch import Tensor, nn

from ..necks import group_norm_groups

__all__ = ["ConvGNReLU", "SemanticFPNDecoder", "DenseHead"]


class ConvGNReLU(nn.Sequential):
    """conv3x3 (no bias) -> GroupNorm -> ReLU; keeps the spatial size."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(group_norm_groups(out_channels), out_channels),
            nn.ReLU(inplace=True),
        )


def _check_levels(in_channels: Union[int, Sequence[int]], strides: Sequence[int]) -> tuple[list[int], list[int]]:
    strides = [int(s) for s in strides]
    # Equal neighbours are allowed: a dilated backbone (output_stride 8) has levels at strides 4, 8, 8, 8.
    if not strides or any(s <= 0 for s in strides) or strides != sorted(strides):
        raise ValueError(f"strides must be positive and non-decreasing (finest first), got {strides}")
    if isinstance(in_channels, int):
        in_channels = [in_channels] * len(strides)
    in_channels = [int(c) for c in in_channels]
    if len(in_channels) != len(strides):
        raise ValueError(f"in_channels {in_channels} and strides {strides} differ in length")
    return in_channels, strides


class SemanticFPNDecoder(nn.Module):
    """Multi-level maps -> one prediction map at the finest level's resolution.

    ``forward(features: list of [B, in_channels[i], H_i, W_i], finest first) -> [B, out_channels, H_0, W_0]``.

    Args:
        in_channels: channels per level (an int for all levels, e.g. the FPN width).
        strides: stride of each level, non-decreasing (e.g. ``[4, 8, 16, 32]``, or ``[4, 8, 8, 8]`` from a
            dilated backbone).
        out_channels: predicted channels.
        channels: width of the conv blocks.
    """

    def __init__(self, in_channels: Union[int, Sequence[int]], strides: Sequence[int], out_channels: int,
                 channels: int = 128):
        super().__init__()
        in_channels, strides = _check_levels(in_channels, strides)
        for arg, v in (("channels", channels), ("out_channels", out_channels)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{arg} must be a positive int, got {v!r}")
        self.strides = strides
        self.scale_heads = nn.ModuleList()
        for c, s in zip(in_channels, strides):
            n = max(1, int(round(math.log2(s / strides[0]))))
            self.scale_heads.append(nn.ModuleList(ConvGNReLU(c if k == 0 else channels, channels) for k in range(n)))
        self.predict = nn.Conv2d(channels, out_channels, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != len(self.scale_heads):
            raise ValueError(f"decoder expects {len(self.scale_heads)} levels, got {len(features)}")
        size = features[0].shape[-2:]
        out = None
        for level, (x, blocks) in enumerate(zip(features, self.scale_heads)):
            for k, block in enumerate(blocks):
                x = block(x)
                if level > 0:
                    # 2x per block; the last block lands exactly on the finest map (odd sizes round).
                    if k + 1 < len(blocks):
                        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
                    else:
                        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            out = x if out is None else out + x
        return self.predict(out)


class DenseHead(nn.Module):
    """Base of the dense heads: a :class:`SemanticFPNDecoder` whose map is bilinearly upsampled to the
    input image size. Subclasses apply their output activation in :meth:`activate`.

    ``forward(features, image_size=(H, W)) -> [B, out_channels, H, W]``.
    """

    def __init__(self, in_channels: Union[int, Sequence[int]], strides: Sequence[int], out_channels: int,
                 channels: int = 128):
        super().__init__()
        self.decoder = SemanticFPNDecoder(in_channels, strides, out_channels, channels=channels)
        self.out_channels = out_channels

    def activate(self, x: Tensor) -> Tensor:
        return x

    def forward(self, features: Sequence[Tensor], image_size: Sequence[int]) -> Tensor:
        x = self.decoder(features)
        x = F.interpolate(x, size=(image_size[0], image_size[1]), mode="bilinear", align_corners=False)
        return self.activate(x)
