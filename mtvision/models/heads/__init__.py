"""Task heads: each takes the neck levels and the image size and returns its map at input resolution."""

from .common import ConvGNReLU, DenseHead, SemanticFPNDecoder
from .depth import DepthHead
from .normals import NormalHead
from .segmentation import SegmentationHead

__all__ = ["ConvGNReLU", "DenseHead", "DepthHead", "NormalHead", "SegmentationHead", "SemanticFPNDecoder"]
