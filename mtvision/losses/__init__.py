"""Task losses; the dense ones call ``mtvision.ops.fused_dense_loss``."""

from .dense import DENSE_TASKS, DenseMultiTaskLoss

__all__ = ["DENSE_TASKS", "DenseMultiTaskLoss"]
