"""Per-task losses: the dense ones through the fused op, detection with FCOS, and their combination."""

from .dense import DENSE_TASKS, DenseMultiTaskLoss
from .detection import FCOSLoss, fcos_targets
from .multitask import DETECTION_TASK, TARGET_KEYS, TASKS, MultiTaskLoss

__all__ = ["DENSE_TASKS", "DETECTION_TASK", "TASKS", "TARGET_KEYS", "DenseMultiTaskLoss", "FCOSLoss",
           "MultiTaskLoss", "fcos_targets"]
