"""Whole-set evaluation of a predictor with the metrics of ``mtvision.evaluation``, as flat dicts."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from ..evaluation import HIGHER_IS_BETTER, DepthMetric, DetectionMetric, NormalMetric, SegmentationMetric

__all__ = ["PRIMARY_METRICS", "build_metrics", "evaluate", "evaluate_model", "primary_score",
           "scalar_metrics"]

#: The metric each task is judged by when picking ``best.pth`` (see ``primary_score``).
PRIMARY_METRICS = {"seg": "seg/mIoU", "depth": "depth/abs_err", "normal": "normal/mean", "det": "det/AP"}

#: A detection head's decoding: ``(raw output [B, ...], image_size) -> per image
#: {"boxes", "scores", "labels"}``.
DetectionDecoder = Callable[[Tensor, Sequence[int]], list]


def build_metrics(tasks: Sequence[str], num_classes: int, ignore_index: int = 255) -> dict:
    """One metric object per task: ``seg`` SegmentationMetric, ``depth`` DepthMetric, ``normal``
    NormalMetric, ``det`` DetectionMetric (COCO box AP)."""
    table = {
        "seg": lambda: SegmentationMetric(num_classes, ignore_index),
        "depth": DepthMetric,
        "normal": NormalMetric,
        "det": lambda: DetectionMetric(num_classes),
    }
    unknown = [t for t in tasks if t not in table]
    if unknown:
        raise ValueError(f"build_metrics: no metric for task(s) {unknown} (known: {', '.join(table)})")
    return {t: table[t]() for t in tasks}


def _flat(task: str, values: Mapping, class_names: Optional[Sequence[str]]) -> dict[str, float]:
    out = {}
    for k, v in values.items():
        if isinstance(v, (list, tuple)):  # per-class IoU / AP -> "seg/IoU/<class>", "det/classAP/<class>"
            names = class_names if class_names and len(class_names) == len(v) else range(len(v))
            out.update({f"{task}/{k}/{n}": float(x) for n, x in zip(names, v)})
        else:
            out[f"{task}/{k}"] = float(v)
    return out


@torch.no_grad()
def evaluate(predict: Callable[[Tensor], Mapping[str, Tensor]], loader: Iterable[dict], tasks: Sequence[str],
             num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu",
             class_names: Optional[Sequence[str]] = None,
             on_batch: Optional[Callable[[dict, Mapping[str, Tensor]], None]] = None,
             decode_detections: Optional[DetectionDecoder] = None) -> dict[str, float]:
    """Run ``predict(images [B,3,H,W]) -> {task: prediction}`` over ``loader`` and return flat metrics.

    Keys: ``seg/mIoU``, ``seg/pixAcc`` and per-class ``seg/IoU/<name>`` (percent; segmentation is scored on
    ``argmax`` of the logits), ``depth/abs_err``, ``depth/rel_err``, ``depth/rmse``, ``depth/log10``,
    ``depth/delta1..3``, ``normal/mean``, ``normal/median``, ``normal/rmse`` (degrees),
    ``normal/within_11.25|22.5|30``, ``det/AP``, ``det/AP50``, ``det/AP75``, ``det/APs|APm|APl`` and
    per-class ``det/classAP/<name>`` (COCO box AP, percent) — for the ``tasks`` given. Dense metrics are
    pooled over every pixel of the set, detection over every image. The ``det`` prediction is decoded into
    boxes by ``decode_detections(output, image_size)`` (default:
    :func:`mtvision.models.heads.decode_detections` with its default thresholds) and scored against the
    batch's ``boxes`` / ``labels``.
    ``on_batch(batch, outputs)``, if given, sees every batch with the predictions the metrics score: the
    dense tasks' raw maps and the ``det`` task's decoded boxes (per image ``{"boxes", "scores",
    "labels"}``), e.g. to write them out (``tools/eval.py --cityscapes-export`` / ``--coco-export``);
    the boxes are decoded once, for both.
    """
    metrics = build_metrics(tasks, num_classes, ignore_index)
    device = torch.device(device)
    if decode_detections is None:
        from ..models.heads import decode_detections as default_decoder

        decode_detections = default_decoder
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        out = predict(images)
        if "det" in metrics:
            out = {**out, "det": decode_detections(out["det"], images.shape[-2:])}
        if on_batch is not None:
            on_batch(batch, out)
        for task, metric in metrics.items():
            if task == "det":
                targets = [{"boxes": b, "labels": lab} for b, lab in zip(batch["boxes"], batch["labels"])]
                metric.update(out[task], targets)
                continue
            pred = out[task].float()
            target = batch[task].to(device, non_blocking=True)
            if task == "seg":
                pred = pred.argmax(1)
            metric.update(pred, target)
    flat: dict[str, float] = {}
    for task, metric in metrics.items():
        flat.update(_flat(task, metric.compute(), class_names if task in ("seg", "det") else None))
    return flat


def evaluate_model(model: nn.Module, loader: Iterable[dict], tasks: Sequence[str], num_classes: int,
                   ignore_index: int = 255, device: torch.device | str = "cpu",
                   autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
                   class_names: Optional[Sequence[str]] = None,
                   on_batch: Optional[Callable[[dict, Mapping[str, Tensor]], None]] = None
                   ) -> dict[str, float]:
    """``evaluate`` of ``model`` in eval mode (restoring its mode after), optionally under ``autocast()``;
    detections are decoded with the ``det`` head's own thresholds (``FCOSHead.predict``)."""
    was_training = model.training
    model.eval()
    ctx = autocast or contextlib.nullcontext

    def predict(images):
        with ctx():
            return model(images)

    heads = getattr(model, "heads", {})
    decoder = heads["det"].predict if "det" in tasks and "det" in heads else None
    try:
        return evaluate(predict, loader, tasks, num_classes, ignore_index, device, class_names, on_batch,
                        decoder)
    finally:
        model.train(was_training)


def scalar_metrics(metrics: Mapping[str, object]) -> dict[str, float]:
    """The entries of a metrics dict that are plain numbers (drops lists and nested values)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def primary_score(metrics: Mapping[str, float], tasks: Sequence[str]) -> float:
    """Model-selection score for ``best.pth``; higher is better.

    The mean over tasks of ``±log(M_t)`` for each task's primary metric ``M_t`` (``PRIMARY_METRICS``:
    seg mIoU, depth abs_err, normal mean angle), ``+`` where higher is better. Comparing two evaluations
    by this score is comparing the geometric mean of their per-task ratios ``M_t / M'_t`` (a
    multiplicative Δm that needs no reference model); with one task it ranks by that task's metric.
    A missing or non-finite metric gives ``-inf`` (never best).
    """
    terms = []
    for t in tasks:
        key = PRIMARY_METRICS.get(t)
        if key is None:
            continue
        v = metrics.get(key)
        if v is None or not math.isfinite(v):
            return -math.inf
        sign = 1.0 if HIGHER_IS_BETTER[key.rsplit("/", 1)[1]] else -1.0
        terms.append(sign * math.log(max(v, 1e-12)))
    return sum(terms) / len(terms) if terms else -math.inf
