"""Task heads: each takes the neck levels and the image size and returns its map at input resolution.

Two families with the same contract (``head(features, image_size) -> [B, C, H, W]``, activation in
``activate``): the semantic-FPN heads (:class:`SegmentationHead`, :class:`DepthHead`,
:class:`NormalHead`) and the DeepLab heads (ASPP, optionally with the DeepLabV3+ decoder;
:class:`DeepLabSegmentationHead`, :class:`DeepLabDepthHead`, :class:`DeepLabNormalHead`).
"""

from .common import ConvGNReLU, DenseHead, SemanticFPNDecoder
from .deeplab import (
    ASPP,
    DeepLabDecoder,
    DeepLabDepthHead,
    DeepLabHead,
    DeepLabNormalHead,
    DeepLabSegmentationHead,
)
from .depth import DepthHead
from .normals import NormalHead
from .segmentation import SegmentationHead

__all__ = [
    "ASPP",
    "ConvGNReLU",
    "DeepLabDecoder",
    "DeepLabDepthHead",
    "DeepLabHead",
    "DeepLabNormalHead",
    "DeepLabSegmentationHead",
    "DenseHead",
    "DepthHead",
    "NormalHead",
    "SegmentationHead",
    "SemanticFPNDecoder",
]
