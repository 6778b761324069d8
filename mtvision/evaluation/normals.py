"""Surface-normal metric: angular error statistics over every valid pixel of the set."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..distributed import all_reduce_sum

__all__ = ["NormalMetric", "BIN_WIDTH_DEG", "NUM_BINS"]

#: Width in degrees of the angle-histogram bins the median is read from.
BIN_WIDTH_DEG = 0.01
#: Number of bins covering [0, 180] degrees (an angle of exactly 180 goes to the last bin).
NUM_BINS = 18000

_THRESHOLDS = (11.25, 22.5, 30.0)


class NormalMetric:
    """Angular error (degrees) between predicted and target normals over all valid pixels of the set.

    ``update(pred, target)`` takes ``[B,3,H,W]`` tensors. ``pred`` is raw and normalised here
    (``F.normalize``, eps 1e-12); a pixel is valid where the target's norm is > 0, and the target is
    normalised too (a no-op for unit targets, a fix for resized ones). The error at a pixel is
    ``acos(clamp(<p, t>, -1, 1))`` in degrees, computed in float64.

    ``compute()`` returns ``mean``, ``median``, ``rmse`` (degrees) and ``within_11.25``,
    ``within_22.5``, ``within_30`` (percent of valid pixels with error strictly below the threshold).
    ``mean``, ``rmse`` and the ``within_*`` values are exact (float64 sums, int64 counts). The median is
    read from an int64 histogram of ``NUM_BINS`` bins of ``BIN_WIDTH_DEG`` degrees, so memory stays fixed
    and the histogram sums across processes: for ``N`` angles it takes the bins holding the sorted
    angles of rank ``(N-1)//2`` and ``N//2`` (the one or two middle values, as ``numpy.median``) and
    returns the mean of those bins' centres. Each centre is within 0.005 degrees of the value it stands
    for, so the reported median is within 0.005 degrees of the exact median.

    With no valid pixel every value is ``NaN`` (nothing raises).
    """

    keys = ("mean", "median", "rmse", "within_11.25", "within_22.5", "within_30")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        # sums: [sum angle, sum angle^2] in degrees
        self.sums = torch.zeros(2, dtype=torch.float64)
        # counts: [valid pixels, below 11.25, below 22.5, below 30]
        self.counts = torch.zeros(1 + len(_THRESHOLDS), dtype=torch.int64)
        self.hist = torch.zeros(NUM_BINS, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Accumulate a batch: ``pred`` (raw) and ``target`` (unit, 0 = invalid) of shape ``[B,3,H,W]``."""
        if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 3:
            raise ValueError(
                f"NormalMetric.update: expected pred and target of shape [B,3,H,W], got "
                f"{tuple(pred.shape)} and {tuple(target.shape)}"
            )
        device = target.device
        if self.hist.device != device:
            self.sums = self.sums.to(device)
            self.counts = self.counts.to(device)
            self.hist = self.hist.to(device)
        # [B,3,H,W] -> [N,3] rows
        t = target.double().movedim(1, -1).reshape(-1, 3)
        p = pred.to(device=device, dtype=torch.float64).movedim(1, -1).reshape(-1, 3)
        valid = (t * t).sum(1) > 0
        t = F.normalize(t[valid], dim=1, eps=1e-12)
        p = F.normalize(p[valid], dim=1, eps=1e-12)
        angle = torch.rad2deg(torch.acos((p * t).sum(1).clamp(-1.0, 1.0)))
        self.sums += torch.stack([angle.sum(), (angle * angle).sum()])
        self.counts += torch.stack(
            [torch.tensor(angle.numel(), device=device, dtype=torch.int64)]
            + [(angle < th).sum() for th in _THRESHOLDS]
        )
        idx = torch.floor(angle / BIN_WIDTH_DEG).long().clamp_(0, NUM_BINS - 1)
        self.hist += torch.bincount(idx, minlength=NUM_BINS)

    def compute(self) -> dict[str, float]:
        """Return the six normal metrics (see the class docstring) over the whole (distributed) set."""
        sums, counts, hist = all_reduce_sum([self.sums, self.counts, self.hist])
        sums = sums.cpu().tolist()
        counts = counts.cpu().tolist()
        n = counts[0]
        if n == 0:
            return {k: math.nan for k in self.keys}
        cum = hist.cpu().cumsum(0)
        # Bin holding the sorted angle of 0-based rank r: first bin whose cumulative count exceeds r.
        lo, hi = torch.searchsorted(cum, torch.tensor([(n - 1) // 2, n // 2]), right=True).tolist()
        median = ((lo + 0.5) + (hi + 0.5)) / 2 * BIN_WIDTH_DEG
        return {
            "mean": sums[0] / n,
            "median": median,
            "rmse": math.sqrt(sums[1] / n),
            "within_11.25": counts[1] / n * 100.0,
            "within_22.5": counts[2] / n * 100.0,
            "within_30": counts[3] / n * 100.0,
        }
