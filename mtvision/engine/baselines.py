"""The trivial baseline: predict the training set's majority class, mean depth and mean normal everywhere."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .evaluator import evaluate

__all__ = ["TrivialPredictor", "fit_trivial_baseline", "trivial_baseline"]


@dataclass
class TrivialPredictor:
    """Constant dense predictions (the same at every pixel of every image).

    ``__call__(images [B,3,H,W]) -> dict``: ``"seg"`` one-hot logits ``[B,C,H,W]`` of ``majority_class``,
    ``"depth"`` ``[B,1,H,W]`` filled with ``mean_depth`` (metres), ``"normal"`` ``[B,3,H,W]`` filled with the
    unit vector ``mean_normal`` — for the tasks whose statistic is set.
    """

    num_classes: int
    majority_class: Optional[int] = None
    mean_depth: Optional[float] = None
    mean_normal: Optional[tuple[float, float, float]] = None

    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        b, _, h, w = images.shape
        out = {}
        if self.majority_class is not None:
            logits = images.new_zeros(b, self.num_classes, h, w)
            logits[:, self.majority_class] = 1.0
            out["seg"] = logits
        if self.mean_depth is not None:
            out["depth"] = images.new_full((b, 1, h, w), self.mean_depth)
        if self.mean_normal is not None:
            out["normal"] = images.new_tensor(self.mean_normal).view(1, 3, 1, 1).expand(b, 3, h, w)
        return out


@torch.no_grad()
def fit_trivial_baseline(loader: Iterable[dict], tasks: Sequence[str], num_classes: int,
                         ignore_index: int = 255, max_batches: Optional[int] = None) -> TrivialPredictor:
    """Statistics over the valid pixels of ``loader`` (at most ``max_batches`` batches): the most frequent
    class, the mean depth (over ``depth > 0``) and the normalised mean of the valid normals."""
    counts = torch.zeros(num_classes, dtype=torch.int64)
    depth_sum, depth_n = 0.0, 0
    normal_sum = torch.zeros(3, dtype=torch.float64)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        if "seg" in tasks:
            seg = batch["seg"].reshape(-1)
            seg = seg[seg != ignore_index]
            counts += torch.bincount(seg, minlength=num_classes)[:num_classes]
        if "depth" in tasks:
            d = batch["depth"]
            valid = d > 0
            depth_sum += float(d[valid].double().sum())
            depth_n += int(valid.sum())
        if "normal" in tasks:
            n = batch["normal"].double()
            valid = (n * n).sum(1, keepdim=True) > 0
            normal_sum += (n * valid).sum((0, 2, 3))
    mean_normal = F.normalize(normal_sum, dim=0, eps=1e-12)
    return TrivialPredictor(
        num_classes=num_classes,
        majority_class=int(counts.argmax()) if "seg" in tasks and counts.sum() > 0 else None,
        mean_depth=depth_sum / depth_n if "depth" in tasks and depth_n > 0 else None,
        mean_normal=(tuple(float(x) for x in mean_normal)
                     if "normal" in tasks and normal_sum.norm() > 0 else None),
    )


def trivial_baseline(train_loader: Iterable[dict], val_loader: Iterable[dict], tasks: Sequence[str],
                     num_classes: int, ignore_index: int = 255, max_train_batches: Optional[int] = None,
                     class_names: Optional[Sequence[str]] = None,
                     ) -> tuple[dict[str, float], TrivialPredictor]:
    """Fit the constant predictor on ``train_loader`` and score it on ``val_loader`` with the same
    metrics as a model (``mtvision.engine.evaluate``). Returns ``(flat metrics, predictor)``."""
    predictor = fit_trivial_baseline(train_loader, tasks, num_classes, ignore_index, max_train_batches)
    missing = [t for t in tasks if t not in predictor(torch.zeros(1, 3, 1, 1))]
    if missing:
        raise ValueError(f"trivial_baseline: no valid training pixel for task(s) {missing}")
    metrics = evaluate(predictor, val_loader, tasks, num_classes, ignore_index, "cpu", class_names)
    return metrics, predictor
