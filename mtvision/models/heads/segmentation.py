"""Semantic segmentation head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

from ...registry import HEADS
from .common import DenseHead

__all__ = ["SegmentationHead"]


@HEADS.register("segmentation")
class SegmentationHead(DenseHead):
    """Per-pixel class logits: ``forward(features, image_size=(H, W)) -> [B, num_classes, H, W]`` (raw
    logits, no softmax), from a semantic-FPN decoder upsampled bilinearly to the image size.

    Args:
        in_channels: channels of each neck level (an int for all levels).
        strides: stride of each level, finest first.
        num_classes: number of classes.
        channels: decoder width.
    """

    #: What the output is, for an exported model's metadata (``mtvision.export``).
    output_description = "segmentation logits [B, num_classes, H, W]; argmax over dim 1"

    def __init__(self, in_channels: Union[int, Sequence[int]], strides: Sequence[int], num_classes: int,
                 channels: int = 128):
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        super().__init__(in_channels, strides, num_classes, channels=channels)
        self.num_classes = num_classes
