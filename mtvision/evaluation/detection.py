"""Object detection metric: COCO box AP (pycocotools' ``COCOeval``) over every image of the set."""

from __future__ import annotations

import contextlib
import io
import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..distributed import dist_ready

__all__ = ["DetectionMetric"]

# One image: predicted boxes [K,4] xyxy float64, scores [K] float64, labels [K] int64,
# target boxes [N,4] xyxy float64, target labels [N] int64 (all on the CPU).
_Record = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


class DetectionMetric:
    """COCO box AP (percent) over every image seen since ``reset()``, computed with pycocotools.

    ``update(preds, targets)`` takes one entry per image:

    - ``preds[i]``: ``{"boxes": [K,4] xyxy pixels, "scores": [K], "labels": int [K]}``;
    - ``targets[i]``: ``{"boxes": [N,4] xyxy pixels, "labels": int [N]}``;

    labels in ``[0, num_classes)``, tensors on any device and of any float dtype. Only the
    ``max_detections`` highest-scoring detections of each image are kept (over all classes, as COCO's
    "100 detections per image"; COCOeval's own ``maxDets`` cut is per image AND class). Every image
    counts, also one without targets (its detections are false positives) or without detections.

    ``compute()`` runs the COCO protocol (``COCOeval(iouType="bbox")``: IoU thresholds 0.50:0.05:0.95,
    101 recall points, ``maxDets`` ``[1, 10, max_detections]``, every target ``iscrowd=0``, area = box
    width x height in pixels: small < 32², medium < 96², large above) and returns ``AP``, ``AP50``,
    ``AP75``, ``APs``, ``APm``, ``APl`` and ``classAP`` (list of ``num_classes`` per-class APs), all in
    percent. A value pycocotools reports as -1 (no target in that area range or class) is ``NaN``; a
    class with targets but no detection has AP 0. pycocotools' printing is suppressed.

    Distributed: AP is not additive, so unlike the other metrics (which sum tensor state) ``compute()``
    gathers every process's per-image records (``all_gather_object``) and evaluates them all, in rank
    order, on every process: the result equals one process that saw every image. Image ids are given
    at ``compute()`` time over the gathered list, so they are unique across processes. The state stays
    local; ``compute()`` may be called several times, ``reset()`` clears it.
    """

    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")

    def __init__(self, num_classes: int, max_detections: int = 100) -> None:
        for name, v in (("num_classes", num_classes), ("max_detections", max_detections)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"DetectionMetric: {name} must be a positive int, got {v!r}")
        self.num_classes = int(num_classes)
        self.max_detections = int(max_detections)
        self.reset()

    def reset(self) -> None:
        """Forget every image seen so far."""
        self._records: list[_Record] = []

    @property
    def num_images(self) -> int:
        """Number of images stored on this process."""
        return len(self._records)

    @torch.no_grad()
    def update(self, preds: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]]) -> None:
        """Store a batch of images (see the class docstring), on the CPU, boxes and scores as float64.

        Raises ValueError, naming the field and the image's index in the batch, for a missing key, boxes
        not ``[K,4]`` or not finite or with x2 < x1 / y2 < y1, scores or labels of another length, labels
        not integer or outside ``[0, num_classes)``, or ``len(preds) != len(targets)``.
        """
        if len(preds) != len(targets):
            raise ValueError(
                f"DetectionMetric.update: len(preds) = {len(preds)} != len(targets) = {len(targets)}"
            )
        records = []
        for i, (p, t) in enumerate(zip(preds, targets)):
            pb = self._boxes(p, "preds", i)
            pl = self._labels(p, "preds", i, len(pb))
            ps = self._field(p, "preds", i, "scores")
            if ps.dim() != 1 or len(ps) != len(pb):
                raise ValueError(f"DetectionMetric.update: preds[{i}]['scores'] has shape {tuple(ps.shape)}, "
                                 f"expected [{len(pb)}] (one score per box)")
            if not ps.is_floating_point():
                raise ValueError(f"DetectionMetric.update: preds[{i}]['scores'] must be floating point, "
                                 f"got {ps.dtype}")
            ps = ps.detach().to("cpu", torch.float64)
            if not bool(torch.isfinite(ps).all()):
                raise ValueError(f"DetectionMetric.update: preds[{i}]['scores'] has non-finite values")
            if len(ps) > self.max_detections:  # keep the top max_detections by score (stable for ties)
                keep = torch.sort(ps, descending=True, stable=True).indices[:self.max_detections]
                keep = keep.sort().values
                pb, ps, pl = pb[keep], ps[keep], pl[keep]
            tb = self._boxes(t, "targets", i)
            tl = self._labels(t, "targets", i, len(tb))
            records.append((pb, ps, pl, tb, tl))
        self._records.extend(records)

    def _field(self, d: Mapping[str, Tensor], what: str, i: int, key: str) -> Tensor:
        if not isinstance(d, Mapping) or key not in d:
            raise ValueError(f"DetectionMetric.update: {what}[{i}] has no {key!r} (expected a dict with it)")
        v = d[key]
        if not isinstance(v, Tensor):
            raise ValueError(
                f"DetectionMetric.update: {what}[{i}]['{key}'] must be a tensor, got {type(v).__name__}"
            )
        return v

    def _boxes(self, d: Mapping[str, Tensor], what: str, i: int) -> Tensor:
        b = self._field(d, what, i, "boxes")
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"DetectionMetric.update: {what}[{i}]['boxes'] has shape {tuple(b.shape)}, "
                             "expected [K, 4] (x1, y1, x2, y2)")
        if not b.is_floating_point():
            raise ValueError(
                f"DetectionMetric.update: {what}[{i}]['boxes'] must be floating point, got {b.dtype}"
            )
        b = b.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(b).all()):
            raise ValueError(f"DetectionMetric.update: {what}[{i}]['boxes'] has non-finite values")
        if bool((b[:, 2:] < b[:, :2]).any()):
            raise ValueError(f"DetectionMetric.update: {what}[{i}]['boxes'] has x2 < x1 or y2 < y1 "
                             "(expected xyxy)")
        return b

    def _labels(self, d: Mapping[str, Tensor], what: str, i: int, n: int) -> Tensor:
        lab = self._field(d, what, i, "labels")
        if lab.dim() != 1 or len(lab) != n:
            raise ValueError(f"DetectionMetric.update: {what}[{i}]['labels'] has shape {tuple(lab.shape)}, "
                             f"expected [{n}] (one label per box)")
        if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
            raise ValueError(f"DetectionMetric.update: {what}[{i}]['labels'] must be an integer tensor, "
                             f"got {lab.dtype}")
        lab = lab.detach().to("cpu", torch.int64)
        bad = (lab < 0) | (lab >= self.num_classes)
        if bool(bad.any()):
            values = torch.unique(lab[bad])[:5].tolist()
            raise ValueError(f"DetectionMetric.update: {what}[{i}]['labels'] value(s) {values} outside "
                             f"[0, {self.num_classes})")
        return lab

    def compute(self) -> dict:
        """Return ``{"AP", "AP50", "AP75", "APs", "APm", "APl": %, "classAP": [per-class %]}`` over the
        whole (distributed) set; ``NaN`` where undefined. Every process must call it (a collective)."""
        records = [tuple(t.numpy() for t in r) for r in self._records]
        if dist_ready():
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        return _coco_box_ap(records, self.num_classes, self.max_detections)


def _xywh(boxes: np.ndarray) -> np.ndarray:
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _coco_box_ap(records: list, num_classes: int, max_detections: int) -> dict:
    """COCOeval on per-image numpy records (see ``_Record``); image ids 1..len(records) in order."""
    nan_result = {k: math.nan for k in DetectionMetric.keys}
    nan_result["classAP"] = [math.nan] * num_classes
    if sum(len(r[4]) for r in records) == 0:
        return nan_result  # no target at all: pycocotools would report -1 everywhere

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = [{"id": i} for i in range(1, len(records) + 1)]
    categories = [{"id": c + 1, "name": str(c)} for c in range(num_classes)]
    gts, dts = [], []
    # Annotation ids start at 1: COCOeval uses 0 for "unmatched".
    for img_id, (pb, ps, pl, tb, tl) in enumerate(records, start=1):
        for box, label in zip(_xywh(tb).tolist(), tl.tolist()):
            gts.append({"id": len(gts) + 1, "image_id": img_id, "category_id": label + 1, "bbox": box,
                        "area": box[2] * box[3], "iscrowd": 0})
        for box, score, label in zip(_xywh(pb).tolist(), ps.tolist(), pl.tolist()):
            dts.append({"id": len(dts) + 1, "image_id": img_id, "category_id": label + 1, "bbox": box,
                        "area": box[2] * box[3], "score": score, "iscrowd": 0})

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt, coco_dt = COCO(), COCO()
        # The results COCO is built like the ground truth instead of through COCO.loadRes, which fails
        # on an empty list (no detection at all) and renumbers the ids.
        coco_gt.dataset = {"images": images, "categories": categories, "annotations": gts}
        coco_dt.dataset = {"images": images, "categories": categories, "annotations": dts}
        coco_gt.createIndex()
        coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = [im["id"] for im in images]
        ev.params.catIds = [c["id"] for c in categories]
        ev.params.maxDets = [1, 10, max_detections]
        ev.evaluate()
        ev.accumulate()

    p = ev.eval["params"]
    precision = ev.eval["precision"]  # [T, R, K, A, M], -1 where undefined
    m = list(p.maxDets).index(max_detections)  # evaluate() sorts maxDets
    area = {lbl: i for i, lbl in enumerate(p.areaRngLbl)}
    t50 = int(np.flatnonzero(np.isclose(p.iouThrs, 0.50))[0])
    t75 = int(np.flatnonzero(np.isclose(p.iouThrs, 0.75))[0])

    def mean(s: np.ndarray) -> float:
        s = s[s > -1]
        return float(s.mean() * 100.0) if s.size else math.nan

    all_ = precision[:, :, :, area["all"], m]
    return {
        "AP": mean(all_),
        "AP50": mean(all_[t50]),
        "AP75": mean(all_[t75]),
        "APs": mean(precision[:, :, :, area["small"], m]),
        "APm": mean(precision[:, :, :, area["medium"], m]),
        "APl": mean(precision[:, :, :, area["large"], m]),
        "classAP": [mean(all_[:, :, k]) for k in range(num_classes)],
    }
