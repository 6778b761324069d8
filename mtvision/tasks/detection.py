"""The built-in detection task: FCOS boxes next to the dense tasks, scored by COCO box AP."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..evaluation import DetectionMetric
from ..registry import HEADS, TASKS
from .base import Task, builtin_delta_metrics, builtin_directions, check_num_classes

__all__ = ["DetectionTask"]


@TASKS.register("det")
class DetectionTask(Task):
    """Boxes: ``boxes`` (per image float32 ``[N,4]`` xyxy pixels) and ``labels`` (int64 ``[N]``) lists;
    the head is a detection head (an ``FCOSHead``, one self-describing output ``[B,A,C+8]``); FCOS loss;
    decoded with the head's own thresholds and NMS; COCO box AP (percent)."""

    target_keys = ("boxes", "labels")
    higher_is_better = builtin_directions("AP", "AP50", "AP75", "APs", "APm", "APl")
    primary_metric = "AP"
    delta_metrics = builtin_delta_metrics("det")
    class_named = True

    @classmethod
    def check_config(cls, name: str, head_spec: Mapping[str, Any], cfg) -> None:
        from ..config import ConfigError
        from ..models.heads import FCOSHead

        if not isinstance(head_spec, Mapping):
            return
        head_name = head_spec.get("name")
        if head_name in HEADS and not issubclass(HEADS[head_name], FCOSHead):
            detection_heads = [n for n, c in HEADS.items() if isinstance(c, type) and issubclass(c, FCOSHead)]
            raise ConfigError(f"model.heads.{name}.name: the {name} task needs a detection head "
                              f"({', '.join(detection_heads)}), got {head_name!r}")
        check_num_classes(name, head_spec, cfg)

    def build_loss(self):
        from ..losses import FCOSLoss

        return _BoxLoss(FCOSLoss(self.head.num_classes, self.head.strides))

    def build_metric(self):
        return DetectionMetric(self.num_classes)

    def predict(self, output: Tensor, image_size):
        if self.head is not None and hasattr(self.head, "predict"):
            return self.head.predict(output, image_size)
        from ..models.heads import decode_detections

        return decode_detections(output, image_size)

    def update_metric(self, metric, prediction, batch, device: torch.device) -> None:
        targets = [{"boxes": b, "labels": lab} for b, lab in zip(batch["boxes"], batch["labels"])]
        metric.update(prediction, targets)


class _BoxLoss(torch.nn.Module):
    """``FCOSLoss`` on a batch's ``boxes`` / ``labels`` lists."""

    def __init__(self, fcos):
        super().__init__()
        self.fcos = fcos

    def forward(self, output: Tensor, batch) -> Tensor:
        return self.fcos(output, batch["boxes"], batch["labels"])
