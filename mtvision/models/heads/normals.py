"""Surface normal head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

from ...registry import HEADS
from .common import DenseHead

__all__ = ["NormalHead"]


@HEADS.register("normals")
class NormalHead(DenseHead):
    """Surface normals: ``forward(features, image_size=(H, W)) -> [B, 3, H, W]`` raw (unnormalised)
    camera-frame vectors (x right, y down, z forward). Normalise where they are used (the loss and the
    metric do), not here, so the gradient does not depend on where the normalisation happens.

    Args:
        in_channels: channels of each neck level (an int for all levels).
        strides: stride of each level, finest first.
        channels: decoder width.
    """

    #: What the output is, for an exported model's metadata (``mtvision.export``).
    output_description = ("surface normals [B, 3, H, W], camera frame (x right, y down, z forward), not unit "
                          "length: normalise over dim 1")

    def __init__(self, in_channels: Union[int, Sequence[int]], strides: Sequence[int], channels: int = 128):
        super().__init__(in_channels, strides, 3, channels=channels)
