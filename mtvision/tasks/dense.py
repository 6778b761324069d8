"""The built-in dense tasks: semantic segmentation, metric depth and surface normals. Their losses are
computed together by one call of the fused op (``fused_slot``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..evaluation import DepthMetric, NormalMetric, SegmentationMetric
from ..registry import TASKS
from .base import Task, builtin_delta_metrics, builtin_directions, check_num_classes

__all__ = ["SegmentationTask", "DepthTask", "NormalTask"]


@TASKS.register("seg")
class SegmentationTask(Task):
    """Per-pixel classes: ``seg`` int64 ``[B,H,W]`` targets (``ignore_index`` skipped), logits
    ``[B,C,H,W]``; cross-entropy loss; mIoU / pixel accuracy scored on the argmax."""

    target_keys = ("seg",)
    higher_is_better = builtin_directions("mIoU", "pixAcc")
    primary_metric = "mIoU"
    delta_metrics = builtin_delta_metrics("seg")
    fused_slot = 0
    class_named = True

    @classmethod
    def check_config(cls, name: str, head_spec: Mapping[str, Any], cfg) -> None:
        check_num_classes(name, head_spec, cfg)

    def build_metric(self):
        return SegmentationMetric(self.num_classes, self.ignore_index)

    def update_metric(self, metric, prediction: Tensor, batch, device: torch.device) -> None:
        metric.update(prediction.argmax(1), batch["seg"].to(device, non_blocking=True))


@TASKS.register("depth")
class DepthTask(Task):
    """Metric depth ``[B,1,H,W]`` in metres (target 0 = invalid); L1 loss; the NYUv2 depth errors."""

    target_keys = ("depth",)
    higher_is_better = builtin_directions("abs_err", "rel_err", "rmse", "log10", "delta1", "delta2", "delta3")
    primary_metric = "abs_err"
    delta_metrics = builtin_delta_metrics("depth")
    fused_slot = 1

    def build_metric(self):
        return DepthMetric()


@TASKS.register("normal")
class NormalTask(Task):
    """Surface normals ``[B,3,H,W]`` (raw prediction, unit targets, 0 = invalid); ``1 - cos`` loss;
    angle errors in degrees."""

    target_keys = ("normal",)
    higher_is_better = builtin_directions("mean", "median", "rmse", "within_11.25", "within_22.5",
                                          "within_30")
    primary_metric = "mean"
    delta_metrics = builtin_delta_metrics("normal")
    fused_slot = 2

    def build_metric(self):
        return NormalMetric()
