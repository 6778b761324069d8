"""Models: timm backbones, FPN neck, dense task heads and the multi-task model that joins them.

``build_model(cfg["model"])`` builds a :class:`MultiTaskModel` from the config's ``model`` section.
"""

from .backbones import BackboneError, TimmCNNBackbone, ViTBackbone, build_backbone
from . import heads
from .heads import *  # noqa: F401,F403 -- every head class, listed once in heads.__all__
from ..registry import BACKBONES, HEADS, NECKS
from .multitask import MultiTaskModel, build_model
from .necks import FPNNeck

__all__ = [
    "BACKBONES",
    "BackboneError",
    "FPNNeck",
    "HEADS",
    "MultiTaskModel",
    "NECKS",
    "TimmCNNBackbone",
    "ViTBackbone",
    "build_backbone",
    "build_model",
    *heads.__all__,
]
