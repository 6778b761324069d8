"""Metric depth head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ...registry import HEADS
from .common import DenseHead

__all__ = ["DepthHead", "check_depth_range", "depth_activation"]


def check_depth_range(min_depth: float, max_depth: Optional[float]) -> tuple[float, Optional[float]]:
    """``(min_depth, max_depth)`` as floats; ValueError naming the argument when ``min_depth <= 0`` or
    ``max_depth <= min_depth``."""
    if not isinstance(min_depth, (int, float)) or isinstance(min_depth, bool) or not min_depth > 0:
        raise ValueError(f"min_depth must be a positive number (metres), got {min_depth!r}")
    if max_depth is not None and (not isinstance(max_depth, (int, float)) or isinstance(max_depth, bool)
                                  or not max_depth > min_depth):
        raise ValueError(f"max_depth must be null or a number > min_depth ({min_depth}), got {max_depth!r}")
    return float(min_depth), None if max_depth is None else float(max_depth)


def depth_activation(x: Tensor, min_depth: float, max_depth: Optional[float]) -> Tensor:
    """Raw map -> strictly positive depth: ``min_depth + softplus(x)``, or with ``max_depth``
    ``min_depth + (max_depth - min_depth) * sigmoid(x)``."""
    if max_depth is None:
        return min_depth + F.softplus(x)
    return min_depth + (max_depth - min_depth) * torch.sigmoid(x)


@HEADS.register("depth")
class DepthHead(DenseHead):
    """Metric z-depth: ``forward(features, image_size=(H, W)) -> [B, 1, H, W]`` in metres, strictly positive.

    The decoder's raw map ``x`` is upsampled bilinearly to the image size, then mapped to depth:

    - ``max_depth=None``: ``depth = min_depth + softplus(x)`` (unbounded above);
    - ``max_depth`` given: ``depth = min_depth + (max_depth - min_depth) * sigmoid(x)``, in
      ``(min_depth, max_depth)``.

    ``min_depth`` (default 1e-3 m) keeps the output > 0 even where softplus/sigmoid underflow.

    Args:
        in_channels: channels of each neck level (an int for all levels).
        strides: stride of each level, finest first.
        channels: decoder width.
        min_depth: lower bound in metres (> 0).
        max_depth: optional upper bound in metres (> min_depth).
    """

    #: What the output is, for an exported model's metadata (``mtvision.export``).
    output_description = "depth [B, 1, H, W] in metres, positive"

    def __init__(self, in_channels: Union[int, Sequence[int]], strides: Sequence[int], channels: int = 128,
                 min_depth: float = 1e-3, max_depth: Optional[float] = None):
        min_depth, max_depth = check_depth_range(min_depth, max_depth)
        super().__init__(in_channels, strides, 1, channels=channels)
        self.min_depth = min_depth
        self.max_depth = max_depth

    def activate(self, x: Tensor) -> Tensor:
        return depth_activation(x, self.min_depth, self.max_depth)
