"""Per-task losses: the dense ones through the fused op, detection with FCOS, and their combination."""

from .dense import DENSE_TASKS, DenseMultiTaskLoss
from .detection import FCOSLoss, fcos_targets
from .multitask import MultiTaskLoss

__all__ = ["DENSE_TASKS", "DenseMultiTaskLoss", "FCOSLoss", "MultiTaskLoss", "fcos_targets"]
