"""Post-processing of a model's raw outputs into what a user of the predictions wants, in fixed-size
tensors an exported graph can compute: class ids (argmax of the logits), depth, unit normals, and
detections decoded with NMS into a fixed number of boxes per image (padded, with a count).

:func:`postprocess_outputs` is what ``tools/export_onnx.py --postprocess`` puts into the ONNX graph, run
here in PyTorch. Its detection decoding (:func:`decode_detections_fixed`) gives the boxes, scores and
labels :func:`mtvision.models.heads.decode_detections` gives (the same candidates, the same class-wise
NMS), sorted by score, in ``[B, max_detections]`` arrays; the NMS is the ``nms_keep`` operator below,
which runs torchvision's NMS in PyTorch and becomes ONNX ``NonMaxSuppression`` in an exported file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import nms

from ..models.heads.detection import detection_scores_and_boxes

__all__ = ["KINDS", "decode_detections_fixed", "detection_settings", "output_names", "postprocess_outputs",
           "task_kinds"]

#: What a task's output is, for post-processing: class logits, metric depth, surface normals, FCOS boxes.
KINDS = ("seg", "depth", "normal", "det")

#: The candidates decode_detections keeps before NMS (its ``pre_nms_top_k`` default).
PRE_NMS_TOP_K = 1000


def task_kinds(tasks: Sequence[str]) -> dict[str, Optional[str]]:
    """``{task: kind}``: the kind (one of :data:`KINDS`) of each registered built-in task (or a subclass of
    one), ``None`` for any other task (its output is passed on as it is)."""
    from ..registry import TASKS
    from ..tasks import DepthTask, DetectionTask, NormalTask, SegmentationTask

    classes = {"seg": SegmentationTask, "depth": DepthTask, "normal": NormalTask, "det": DetectionTask}
    out: dict[str, Optional[str]] = {}
    for task in tasks:
        cls = TASKS.get(task)
        out[task] = next((k for k, base in classes.items()
                          if isinstance(cls, type) and issubclass(cls, base)), None)
    return out


def detection_settings(head: Any) -> dict[str, Any]:
    """The decoding settings of a detection head (its thresholds and box count; decode_detections'
    defaults where the head has none)."""
    return {"score_threshold": float(getattr(head, "score_threshold", 0.05)),
            "nms_threshold": float(getattr(head, "nms_threshold", 0.6)),
            "max_detections": int(getattr(head, "max_detections", 100)),
            "pre_nms_top_k": int(getattr(head, "pre_nms_top_k", PRE_NMS_TOP_K))}


def output_names(task: str, kind: Optional[str]) -> list[str]:
    """The post-processed outputs of ``task``: ``<task>_labels`` (seg), ``<task>`` (depth, normal, and a
    task of no known kind), ``<task>_boxes``, ``_scores``, ``_labels``, ``_count`` (det)."""
    if kind == "seg":
        return [f"{task}_labels"]
    if kind == "det":
        return [f"{task}_{k}" for k in ("boxes", "scores", "labels", "count")]
    return [task]


# -- NMS: torchvision's in PyTorch, ONNX NonMaxSuppression in an exported graph -----------------------

@torch.library.custom_op("mtvision_inference::nms_keep", mutates_args=())
def nms_keep(boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float) -> Tensor:
    """``[B, K]`` bool: which of the boxes ``[B, K, 4]`` (xyxy) with ``scores`` ``[B, K]`` NMS keeps,
    per image, among those scoring above ``score_threshold`` (torchvision's ``nms`` at ``iou_threshold``)."""
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    for b in range(boxes.shape[0]):
        valid = torch.nonzero(scores[b] > score_threshold).squeeze(1)
        kept = nms(boxes[b, valid].float(), scores[b, valid].float(), iou_threshold)
        keep[b, valid[kept]] = True
    return keep


@nms_keep.register_fake
def _(boxes, scores, iou_threshold, score_threshold):
    return torch.empty(scores.shape, dtype=torch.bool, device=scores.device)


def decode_detections_fixed(output: Tensor, image_size: Sequence[int], score_threshold: float = 0.05,
                            nms_threshold: float = 0.6, max_detections: int = 100,
                            pre_nms_top_k: int = PRE_NMS_TOP_K) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """FCOS output ``[B, A, C + 8]`` -> ``(boxes [B, M, 4], scores [B, M], labels [B, M], count [B])`` with
    ``M = max_detections``: per image the first ``count`` entries are the detections
    :func:`~mtvision.models.heads.decode_detections` gives (boxes clipped to ``image_size``, by
    decreasing score), the rest padding (box and score 0, label -1). Fixed shapes throughout, so it
    exports to ONNX (``TopK``, ``NonMaxSuppression``, ``GatherElements``)."""
    scores_all, boxes_all = detection_scores_and_boxes(output, image_size)
    C = scores_all.shape[-1]
    flat = scores_all.flatten(1)
    k = torch.sym_min(pre_nms_top_k, flat.shape[1])
    top, idx = flat.topk(k, dim=1)  # the candidates, by decreasing score
    points, labels = idx // C, idx % C
    boxes = torch.gather(boxes_all, 1, points.unsqueeze(-1).expand(-1, -1, 4))
    valid = top > score_threshold
    # class-wise NMS as torchvision's batched_nms does it: each class's boxes moved by
    # class * (largest coordinate + 1), so boxes of different classes never overlap
    largest = torch.where(valid.unsqueeze(-1), boxes, torch.zeros_like(boxes)).amax(dim=(1, 2), keepdim=True)
    shifted = boxes + (labels.to(boxes.dtype) * (largest.squeeze(-1) + 1.0)).unsqueeze(-1)
    keep = torch.ops.mtvision_inference.nms_keep(shifted, top, nms_threshold, score_threshold)
    # the kept candidates in score order: key k - rank for a kept one, 0 for the others
    rank_key = keep.to(torch.int64) * (k - torch.arange(k, device=keep.device)).unsqueeze(0)
    m = torch.sym_min(max_detections, k)
    key, order = rank_key.topk(m, dim=1)
    found = key > 0
    out_boxes = torch.gather(boxes, 1, order.unsqueeze(-1).expand(-1, -1, 4)) * found.unsqueeze(-1)
    out_scores = torch.gather(top, 1, order) * found
    out_labels = torch.where(found, torch.gather(labels, 1, order), torch.full_like(order, -1))
    count = found.sum(dim=1)
    if max_detections > m:  # fewer candidates than boxes asked for: pad
        pad = max_detections - m
        out_boxes = F.pad(out_boxes, (0, 0, 0, pad))
        out_scores = F.pad(out_scores, (0, pad))
        out_labels = F.pad(out_labels, (0, pad), value=-1)
    return out_boxes, out_scores, out_labels, count


def postprocess_outputs(outputs: Mapping[str, Tensor], image_size: Sequence[int],
                        kinds: Mapping[str, Optional[str]],
                        det_settings: Optional[Mapping[str, Mapping[str, Any]]] = None) -> dict[str, Tensor]:
    """The model's raw ``outputs`` (``{task: map}``, batched) -> ``{name: tensor}`` named by
    :func:`output_names`, at ``image_size = (H, W)`` (a dense map of another size is resized bilinearly):
    ``seg`` class ids int64 ``[B, H, W]`` (argmax of the logits), ``depth`` ``[B, H, W]`` metres,
    ``normal`` ``[B, 3, H, W]`` unit vectors, ``det`` :func:`decode_detections_fixed` with the task's
    ``det_settings`` (``{task: settings}``, :func:`detection_settings`). Float32."""
    out: dict[str, Tensor] = {}
    for task, x in outputs.items():
        kind = kinds.get(task)
        names = output_names(task, kind)
        if kind == "det":
            settings = dict((det_settings or {}).get(task, {}))
            out.update(zip(names, decode_detections_fixed(x, image_size, **settings)))
            continue
        if kind is None:
            out[task] = x
            continue
        x = x.float()
        if x.shape[-2:] != tuple(image_size):
            x = F.interpolate(x, size=tuple(image_size), mode="bilinear", align_corners=False)
        if kind == "seg":
            out[names[0]] = x.argmax(dim=1)
        elif kind == "depth":
            out[names[0]] = x[:, 0]
        else:
            out[names[0]] = F.normalize(x, dim=1)
    return out
