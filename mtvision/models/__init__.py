"""Models: timm backbones, FPN neck, dense task heads and the multi-task model that joins them.

``build_model(cfg["model"])`` builds a :class:`MultiTaskModel` from the config's ``model`` section.
"""

from .backbones import BackboneError, TimmCNNBackbone, ViTBackbone, build_backbone
from .heads import (
    ASPP,
    DeepLabDecoder,
    DeepLabDepthHead,
    DeepLabHead,
    DeepLabNormalHead,
    DeepLabSegmentationHead,
    DenseHead,
    DepthHead,
    NormalHead,
    SegmentationHead,
    SemanticFPNDecoder,
)
from .multitask import HEADS, NECKS, MultiTaskModel, build_model
from .necks import FPNNeck

__all__ = [
    "ASPP",
    "BackboneError",
    "DeepLabDecoder",
    "DeepLabDepthHead",
    "DeepLabHead",
    "DeepLabNormalHead",
    "DeepLabSegmentationHead",
    "DenseHead",
    "DepthHead",
    "FPNNeck",
    "HEADS",
    "MultiTaskModel",
    "NECKS",
    "NormalHead",
    "SegmentationHead",
    "SemanticFPNDecoder",
    "TimmCNNBackbone",
    "ViTBackbone",
    "build_backbone",
    "build_model",
]
