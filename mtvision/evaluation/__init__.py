"""Whole-set evaluation metrics (segmentation, depth, normals, detection AP) and the multi-task Δm.

Every metric has ``update(...)``, ``compute() -> dict`` and ``reset()``; its state is additive tensors
that ``compute()`` sums across processes when torch.distributed is initialised (``DetectionMetric``,
whose AP is not additive, gathers its per-image records instead), so results depend neither on the
batch size nor on the number of processes.
"""

from .delta import (DELTA_M_METRICS, HIGHER_IS_BETTER, delta_m, delta_m_metrics, delta_table, read_auxiliary_tasks,
                    read_baselines, read_metrics, relative_changes, without_tasks)
from .depth import DepthMetric
from .detection import DetectionMetric
from .normals import NormalMetric
from .segmentation import SegmentationMetric

__all__ = [
    "SegmentationMetric",
    "DepthMetric",
    "NormalMetric",
    "DetectionMetric",
    "delta_m",
    "relative_changes",
    "HIGHER_IS_BETTER",
    "DELTA_M_METRICS",
    "delta_m_metrics",
    "delta_table",
    "read_baselines",
    "read_metrics",
    "read_auxiliary_tasks",
    "without_tasks",
]
