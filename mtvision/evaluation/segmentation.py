"""Semantic segmentation metric: mIoU and pixel accuracy from one confusion matrix over the whole set."""

from __future__ import annotations

import math

import torch

from ..distributed import all_reduce_sum

__all__ = ["SegmentationMetric"]


class SegmentationMetric:
    """mIoU / pixel accuracy / per-class IoU (all in percent) over every pixel seen since ``reset()``.

    ``update(pred_labels, target)`` takes integer class maps of the same shape, normally ``[B,H,W]``
    (pass ``logits.argmax(1)``). Pixels whose target equals ``ignore_index`` are skipped. The state is a
    single int64 ``[C,C]`` confusion matrix (rows = target, columns = prediction) kept on the inputs'
    device and summed across processes by ``compute()``.

    ``compute()`` returns:

    - ``"mIoU"``: mean IoU over the classes present in the target or the prediction; a class absent
      from both has an undefined IoU and is left out of the mean.
    - ``"pixAcc"``: correctly labelled pixels / valid pixels.
    - ``"IoU"``: list of ``num_classes`` floats indexed by class id, ``NaN`` for a class absent from
      both prediction and target.

    With no valid pixel at all (empty set, or every pixel ignored) ``mIoU`` and ``pixAcc`` are ``NaN``
    (nothing raises); ``mtvision.evaluation.delta_m`` rejects such a value by name.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"SegmentationMetric: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred_labels: torch.Tensor, target: torch.Tensor) -> None:
        """Accumulate a batch: ``pred_labels`` and ``target`` integer tensors of equal shape ``[B,H,W]``.

        Raises ValueError for mismatched shapes, floating-point inputs, or a target (outside the
        ignored pixels) or prediction value outside ``[0, num_classes)``, naming the bad value.
        """
        if pred_labels.shape != target.shape:
            hint = " (pass logits.argmax(1), not logits)" if pred_labels.dim() == target.dim() + 1 else ""
            raise ValueError(
                f"SegmentationMetric.update: pred_labels shape {tuple(pred_labels.shape)} != "
                f"target shape {tuple(target.shape)}{hint}"
            )
        for name, t in (("pred_labels", pred_labels), ("target", target)):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise ValueError(
                    f"SegmentationMetric.update: {name} must be an integer tensor, got {t.dtype}"
                )
        if self.confusion.device != target.device:
            self.confusion = self.confusion.to(target.device)
        C = self.num_classes
        target = target.reshape(-1).long()
        pred = pred_labels.reshape(-1).to(device=target.device, dtype=torch.long)
        valid = target != self.ignore_index
        t = target[valid]
        p = pred[valid]
        if t.numel() == 0:
            return
        bad_t = (t < 0) | (t >= C)
        if bool(bad_t.any()):
            values = torch.unique(t[bad_t])[:5].tolist()
            raise ValueError(
                f"SegmentationMetric.update: target value(s) {values} outside [0, {C}) and not "
                f"ignore_index={self.ignore_index}"
            )
        bad_p = (p < 0) | (p >= C)
        if bool(bad_p.any()):
            values = torch.unique(p[bad_p])[:5].tolist()
            raise ValueError(f"SegmentationMetric.update: pred_labels value(s) {values} outside [0, {C})")
        self.confusion += torch.bincount(t * C + p, minlength=C * C).reshape(C, C)

    def compute(self) -> dict:
        """Return ``{"mIoU": %, "pixAcc": %, "IoU": [per-class %]}`` over the whole (distributed) set."""
        (conf,) = all_reduce_sum([self.confusion])
        conf = conf.cpu().double()
        tp = conf.diagonal()
        union = conf.sum(0) + conf.sum(1) - tp
        present = union > 0
        iou = torch.full_like(tp, math.nan)
        iou[present] = tp[present] / union[present] * 100.0
        total = conf.sum()
        miou = float(iou[present].mean()) if bool(present.any()) else math.nan
        pix_acc = float(tp.sum() / total * 100.0) if total > 0 else math.nan
        return {"mIoU": miou, "pixAcc": pix_acc, "IoU": iou.tolist()}
