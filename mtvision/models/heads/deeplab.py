"""DeepLab heads (ASPP, optionally with the DeepLabV3+ decoder) for segmentation, depth and normals.

The heads of the LibMTL / MTAN ResNet-50 protocol on NYUv2 and Cityscapes: each task owns an ASPP module
(Chen et al. 2017, "Rethinking Atrous Convolution", DeepLabV3) on the last map of a dilated (output
stride 8) ResNet-50. The layout follows LibMTL's ``DeepLabHead``/``ASPP`` (``LibMTL/model/decoder/
DeepLabHead.py``, ``examples/nyu/aspp.py``, itself torchvision's DeepLabV3 head) and MTAN's
``model_resnet_mtan``:

- ASPP: a 1x1 branch, three 3x3 branches with atrous rates ``(12, 24, 36)`` (the rates for output
  stride 8; DeepLab uses ``(6, 12, 18)`` at output stride 16), and an image-pooling branch, each
  conv-BatchNorm-ReLU with 256 channels, concatenated and projected by a 1x1 conv-BN-ReLU and
  ``Dropout(0.5)``.
- ``low_level_channels=None`` (the LibMTL / MTAN head, "DeepLabV3"): conv3x3-BN-ReLU then a 1x1 conv to
  the outputs, at the ASPP map's resolution.
- ``low_level_channels=48`` (default, "DeepLabV3+", Chen et al. 2018, "Encoder-Decoder with Atrous
  Separable Convolution"): the ASPP map is upsampled bilinearly to the stride-4 level of the backbone,
  concatenated with that level projected to 48 channels (1x1 conv-BN-ReLU), refined by two
  conv3x3-BN-ReLU (256 channels; the paper's best decoder, its Table 2) and a 1x1 conv predicts.

The map is then upsampled bilinearly to the image size and put through the task's activation, as the
semantic-FPN heads do (logits raw, depth strictly positive, normals raw for the fused loss).

Normalisation is BatchNorm, as in the protocol. Batch-1 evaluation uses the running statistics as usual;
in training mode a batch of one image is allowed too: the image-pooling branch (a 1x1 map, where
BatchNorm has a single value per channel and cannot compute batch statistics) then normalises with its
running statistics instead of failing. (Like any BatchNorm network, a batch of one whose ASPP input map is
itself 1x1 still cannot train.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...registry import HEADS
from .common import _check_levels
from .depth import DepthHead, check_depth_range, depth_activation
from .normals import NormalHead
from .segmentation import SegmentationHead

__all__ = [
    "ASPP",
    "DeepLabDecoder",
    "DeepLabHead",
    "DeepLabSegmentationHead",
    "DeepLabDepthHead",
    "DeepLabNormalHead",
]


def _positive_int(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


class ConvBNReLU(nn.Sequential):
    """conv (no bias, ``k x k``, dilation ``d``, same size) -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1):
        pad = dilation * (kernel_size // 2)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=pad, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class ASPPPooling(nn.Module):
    """Image-level branch of ASPP: global average pool -> 1x1 conv -> BN -> ReLU, broadcast back to the
    map's size. With a single image in training mode the BN uses its running statistics (a batch of one
    1x1 map has no variance to normalise with)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        y = self.conv(x.mean(dim=(2, 3), keepdim=True))
        # (a SyncBatchNorm -- train.sync_bn on several processes -- has the other processes' images)
        if self.training and y.shape[0] == 1 and not isinstance(self.bn, nn.SyncBatchNorm):
            bn = self.bn
            y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        else:
            y = self.bn(y)
        return F.relu(y).expand(-1, -1, h, w)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3). ``forward(x [B, in_channels, h, w]) -> [B, channels, h, w]``.

    Args:
        in_channels: channels of the input map.
        atrous_rates: dilation of the three 3x3 branches.
        channels: width of every branch and of the output.
        dropout: dropout probability after the projection (training only).
    """

    def __init__(self, in_channels: int, atrous_rates: Sequence[int] = (12, 24, 36), channels: int = 256,
                 dropout: float = 0.5):
        super().__init__()
        if (not isinstance(atrous_rates, (list, tuple)) or len(atrous_rates) != 3
                or not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in atrous_rates)):
            raise ValueError(f"atrous_rates must be three positive ints, got {atrous_rates!r}")
        rates = [int(r) for r in atrous_rates]
        self.branches = nn.ModuleList(
            [ConvBNReLU(in_channels, channels, 1)]
            + [ConvBNReLU(in_channels, channels, 3, dilation=r) for r in rates]
            + [ASPPPooling(in_channels, channels)]
        )
        self.project = nn.Sequential(ConvBNReLU(5 * channels, channels, 1), nn.Dropout(dropout))
        self.atrous_rates = tuple(rates)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class DeepLabDecoder(nn.Module):
    """Feature levels -> raw prediction map: ASPP on the deepest level, then the DeepLabV3 head
    (``low_level_channels=None``) or the DeepLabV3+ decoder with the level of stride ``low_level_stride``.

    ``forward(features: list of [B, in_channels[i], H_i, W_i], finest first) -> [B, out_channels, h, w]``
    at the deepest level's size (V3) or the low-level map's size (V3+).

    Args:
        in_channels: channels per level (an int for all levels).
        strides: stride of each level, non-decreasing (e.g. ``[4, 8]`` or ``[4, 8, 8, 8]`` from a dilated
            ResNet, ``[4, 8, 16, 32]`` from an FPN).
        out_channels: predicted channels.
        channels: ASPP and decoder width (256 in DeepLab).
        atrous_rates: ASPP rates (``(12, 24, 36)`` at output stride 8, ``(6, 12, 18)`` at 16).
        low_level_channels: width of the projected low-level feature (48 in DeepLabV3+), or ``None`` for
            the plain DeepLabV3 head (LibMTL / MTAN).
        low_level_stride: stride of the level fused by the V3+ decoder (the first level with that stride).
        dropout: ASPP dropout.
    """

    def __init__(self, in_channels: Union[int, Sequence[int]], strides: Sequence[int], out_channels: int,
                 channels: int = 256, atrous_rates: Sequence[int] = (12, 24, 36),
                 low_level_channels: Optional[int] = 48, low_level_stride: int = 4, dropout: float = 0.5):
        super().__init__()
        in_channels, strides = _check_levels(in_channels, strides)
        _positive_int("out_channels", out_channels)
        _positive_int("channels", channels)
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.num_levels = len(strides)
        self.aspp = ASPP(in_channels[-1], atrous_rates, channels, float(dropout))
        self.low_level_index: Optional[int] = None
        if low_level_channels is None:
            self.head = nn.Sequential(ConvBNReLU(channels, channels, 3), nn.Conv2d(channels, out_channels, 1))
        else:
            _positive_int("low_level_channels", low_level_channels)
            _positive_int("low_level_stride", low_level_stride)
            if low_level_stride not in strides[:-1]:
                raise ValueError(f"low_level_stride {low_level_stride} is not the stride of a level before the "
                                 f"last (level strides: {strides}); the DeepLabV3+ decoder needs it (set "
                                 "low_level_channels to null for the plain DeepLabV3 head)")
            self.low_level_index = strides.index(low_level_stride)
            self.project_low = ConvBNReLU(in_channels[self.low_level_index], low_level_channels, 1)
            self.head = nn.Sequential(
                ConvBNReLU(channels + low_level_channels, channels, 3),
                ConvBNReLU(channels, channels, 3),
                nn.Conv2d(channels, out_channels, 1),
            )
        self.strides = strides

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != self.num_levels:
            raise ValueError(f"DeepLab decoder expects {self.num_levels} levels, got {len(features)}")
        x = self.aspp(features[-1])
        if self.low_level_index is not None:
            low = self.project_low(features[self.low_level_index])
            x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, low], dim=1)
        return self.head(x)


class DeepLabHead(nn.Module):
    """Base of the DeepLab task heads: a :class:`DeepLabDecoder` whose map is upsampled bilinearly to the
    image size; subclasses apply their activation in :meth:`activate` (the semantic-FPN heads' contract).

    ``forward(features, image_size=(H, W)) -> [B, out_channels, H, W]``.
    """

    def __init__(self, in_channels: Union[int, Sequence[int]], strides: Sequence[int], out_channels: int,
                 channels: int = 256, atrous_rates: Sequence[int] = (12, 24, 36),
                 low_level_channels: Optional[int] = 48, low_level_stride: int = 4, dropout: float = 0.5):
        super().__init__()
        self.decoder = DeepLabDecoder(in_channels, strides, out_channels, channels=channels,
                                      atrous_rates=atrous_rates, low_level_channels=low_level_channels,
                                      low_level_stride=low_level_stride, dropout=dropout)
        self.out_channels = out_channels

    def activate(self, x: Tensor) -> Tensor:
        return x

    def forward(self, features: Sequence[Tensor], image_size: Sequence[int]) -> Tensor:
        x = self.decoder(features)
        x = F.interpolate(x, size=(int(image_size[0]), int(image_size[1])), mode="bilinear", align_corners=False)
        return self.activate(x)


@HEADS.register("deeplab_segmentation")
class DeepLabSegmentationHead(DeepLabHead):
    """Per-pixel class logits ``[B, num_classes, H, W]`` (raw, no softmax) from a DeepLab head.

    Args:
        in_channels: channels of each level (the backbone's levels with ``neck: {name: none}``).
        strides: stride of each level, finest first.
        num_classes: number of classes.
        channels: ASPP / decoder width (256).
        atrous_rates: ASPP rates; ``(12, 24, 36)`` for an output-stride-8 backbone (LibMTL, torchvision).
        low_level_channels: 48 for the DeepLabV3+ decoder on the stride-``low_level_stride`` level;
            ``None`` for LibMTL's / MTAN's head (ASPP, conv3x3-BN-ReLU, conv1x1 on the last level only).
        low_level_stride: stride of the level the V3+ decoder fuses (4).
        dropout: ASPP dropout (0.5).
    """

    output_description = SegmentationHead.output_description

    def __init__(self, in_channels: Union[int, Sequence[int]], strides: Sequence[int], num_classes: int,
                 channels: int = 256, atrous_rates: Sequence[int] = (12, 24, 36),
                 low_level_channels: Optional[int] = 48, low_level_stride: int = 4, dropout: float = 0.5):
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        super().__init__(in_channels, strides, num_classes, channels=channels, atrous_rates=atrous_rates,
                         low_level_channels=low_level_channels, low_level_stride=low_level_stride, dropout=dropout)
        self.num_classes = num_classes


@HEADS.register("deeplab_depth")
class DeepLabDepthHead(DeepLabHead):
    """Metric depth ``[B, 1, H, W]`` in metres, strictly positive (``min_depth + softplus``, or a sigmoid
    between ``min_depth`` and ``max_depth``, as :class:`~mtvision.models.heads.DepthHead`).

    Args: as :class:`DeepLabSegmentationHead` without ``num_classes``, and
        min_depth: lower bound in metres (> 0).
        max_depth: optional upper bound in metres (> min_depth).
    """

    output_description = DepthHead.output_description

    def __init__(self, in_channels: Union[int, Sequence[int]], strides: Sequence[int], channels: int = 256,
                 atrous_rates: Sequence[int] = (12, 24, 36), low_level_channels: Optional[int] = 48,
                 low_level_stride: int = 4, dropout: float = 0.5, min_depth: float = 1e-3,
                 max_depth: Optional[float] = None):
        min_depth, max_depth = check_depth_range(min_depth, max_depth)
        super().__init__(in_channels, strides, 1, channels=channels, atrous_rates=atrous_rates,
                         low_level_channels=low_level_channels, low_level_stride=low_level_stride, dropout=dropout)
        self.min_depth = min_depth
        self.max_depth = max_depth

    def activate(self, x: Tensor) -> Tensor:
        return depth_activation(x, self.min_depth, self.max_depth)


@HEADS.register("deeplab_normals")
class DeepLabNormalHead(DeepLabHead):
    """Surface normals ``[B, 3, H, W]``: raw camera-frame vectors (normalised by the loss and the metric,
    not here). Args: as :class:`DeepLabSegmentationHead` without ``num_classes``."""

    output_description = NormalHead.output_description

    def __init__(self, in_channels: Union[int, Sequence[int]], strides: Sequence[int], channels: int = 256,
                 atrous_rates: Sequence[int] = (12, 24, 36), low_level_channels: Optional[int] = 48,
                 low_level_stride: int = 4, dropout: float = 0.5):
        super().__init__(in_channels, strides, 3, channels=channels, atrous_rates=atrous_rates,
                         low_level_channels=low_level_channels, low_level_stride=low_level_stride, dropout=dropout)
