"""Whole-set evaluation of a predictor with the metrics of ``mtvision.evaluation``, as flat dicts."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from ..distributed import all_gather_objects
from ..tasks import build_tasks, metric_direction, primary_metric_key

__all__ = ["build_metrics", "evaluate", "evaluate_model", "primary_score", "scalar_metrics"]

def build_metrics(tasks: Sequence[str], num_classes: int, ignore_index: int = 255) -> dict:
    """One metric object per task, each the registered task's own (``Task.build_metric``)."""
    return {t.name: t.build_metric() for t in build_tasks(tasks, num_classes, ignore_index)}


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
             heads: Optional[Mapping[str, nn.Module]] = None,
             skipped: Optional[list] = None) -> dict[str, float]:
    """Run ``predict(images [B,3,H,W]) -> {task: prediction}`` over ``loader`` and return flat metrics.

    Keys: ``seg/mIoU``, ``seg/pixAcc`` and per-class ``seg/IoU/<name>`` (percent; segmentation is scored on
    ``argmax`` of the logits), ``depth/abs_err``, ``depth/rel_err``, ``depth/rmse``, ``depth/log10``,
    ``depth/delta1..3``, ``normal/mean``, ``normal/median``, ``normal/rmse`` (degrees),
    ``normal/within_11.25|22.5|30``, ``det/AP``, ``det/AP50``, ``det/AP75``, ``det/APs|APm|APl`` and
    per-class ``det/classAP/<name>`` (COCO box AP, percent) — for the ``tasks`` given. Dense metrics are
    pooled over every pixel of the set, detection over every image. Each task turns the raw output into
    what its metric scores (``Task.predict``): the ``det`` output is decoded into boxes by ``heads["det"]``'s
    own thresholds when ``heads`` is given, else by :func:`mtvision.models.heads.decode_detections`'s
    defaults, and scored against the batch's ``boxes`` / ``labels``.
    ``on_batch(batch, outputs)``, if given, sees every batch with the predictions the metrics score: the
    dense tasks' raw maps and the ``det`` task's decoded boxes (per image ``{"boxes", "scores",
    "labels"}``), e.g. to write them out (``tools/eval.py --cityscapes-export`` / ``--coco-export``);
    the boxes are decoded once, for both. ``skipped``, if given, is extended with the samples the loader
    could not read (``data.skip_bad``; each a message naming the file), over every process.
    """
    task_objs = build_tasks(tasks, num_classes, ignore_index, heads)
    metrics = {t.name: t.build_metric() for t in task_objs}
    device = torch.device(device)
    dropped: list[str] = []
    for batch in loader:
        dropped += batch.get("skipped_files", [])
        if "image" not in batch:  # nothing but unreadable samples
            continue
        images = batch["image"].to(device, non_blocking=True)
        out = dict(predict(images))
        for task in task_objs:
            out[task.name] = task.predict(out[task.name], images.shape[-2:])
        if on_batch is not None:
            on_batch(batch, out)
        for task in task_objs:
            task.update_metric(metrics[task.name], out[task.name], batch, device)
    if skipped is not None:
        skipped.extend(f for names in all_gather_objects(dropped) for f in names)
    flat: dict[str, float] = {}
    for task in task_objs:
        names = class_names if task.class_named else None
        flat.update(_flat(task.name, metrics[task.name].compute(), names))
    return flat


def evaluate_model(model: nn.Module, loader: Iterable[dict], tasks: Sequence[str], num_classes: int,
                   ignore_index: int = 255, device: torch.device | str = "cpu",
                   autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
                   class_names: Optional[Sequence[str]] = None,
                   on_batch: Optional[Callable[[dict, Mapping[str, Tensor]], None]] = None,
                   skipped: Optional[list] = None) -> dict[str, float]:
    """``evaluate`` of ``model`` in eval mode (restoring its mode after), optionally under ``autocast()``;
    detections are decoded with the ``det`` head's own thresholds (``FCOSHead.predict``)."""
    was_training = model.training
    model.eval()
    ctx = autocast or contextlib.nullcontext

    def predict(images):
        with ctx():
            return model(images)

    heads = getattr(model, "heads", {})
    try:
        return evaluate(predict, loader, tasks, num_classes, ignore_index, device, class_names, on_batch,
                        heads=heads, skipped=skipped)
    finally:
        model.train(was_training)


def scalar_metrics(metrics: Mapping[str, object]) -> dict[str, float]:
    """The entries of a metrics dict that are plain numbers (drops lists and nested values)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def primary_score(metrics: Mapping[str, float], tasks: Sequence[str]) -> float:
    """Model-selection score for ``best.pth``; higher is better.

    The mean over tasks of ``±log(M_t)`` for each task's primary metric ``M_t`` (``Task.primary_metric``:
    seg mIoU, depth abs_err, normal mean angle, det AP), ``+`` where higher is better. Comparing two
    evaluations by this score is comparing the geometric mean of their per-task ratios ``M_t / M'_t`` (a
    multiplicative Δm that needs no reference model); with one task it ranks by that task's metric.
    A missing or non-finite metric gives ``-inf`` (never best).
    """
    terms = []
    for t in tasks:
        key = primary_metric_key(t)
        if key is None:
            continue
        v = metrics.get(key)
        if v is None or not math.isfinite(v):
            return -math.inf
        sign = 1.0 if metric_direction(key) else -1.0
        terms.append(sign * math.log(max(v, 1e-12)))
    return sum(terms) / len(terms) if terms else -math.inf
