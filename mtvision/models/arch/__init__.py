"""Multi-task architectures beyond hard sharing (``model.arch.name``): ``soft_sharing``, ``cross_stitch``,
``mtan`` and ``padnet``; ``hps`` (one backbone and neck, a head per task) is
:class:`~mtvision.models.MultiTaskModel`. :mod:`.base` says what every architecture gives the trainer."""

from .base import ModelParts, TaskNetworks, is_dense_head
from .cross_stitch import CrossStitchModel, CrossStitchUnit
from .mtan import MTANModel, TaskAttention
from .padnet import PADNetModel, SpatialAttention
from .soft_sharing import SoftSharingModel

__all__ = ["CrossStitchModel", "CrossStitchUnit", "MTANModel", "ModelParts", "PADNetModel",
           "SoftSharingModel", "SpatialAttention", "TaskAttention", "TaskNetworks", "is_dense_head"]
