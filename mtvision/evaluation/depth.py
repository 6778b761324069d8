"""Depth metric: the NYUv2 / Eigen error and accuracy measures, averaged over every valid pixel of the set."""

from __future__ import annotations

import math

import torch

from ..distributed import all_reduce_sum

__all__ = ["DepthMetric", "MIN_PRED_DEPTH"]

#: Predictions are clamped to at least this many metres before a log or a ratio is taken (``log10``,
#: ``delta*``), so a zero or negative prediction gives a large finite error instead of inf/NaN.
#: ``abs_err``, ``rel_err`` and ``rmse`` use the raw prediction.
MIN_PRED_DEPTH = 1e-3

_DELTA_BASE = 1.25


class DepthMetric:
    """Depth errors over all pixels where ``target > 0``, pooled across every batch and process.

    ``update(pred, target)`` takes ``[B,1,H,W]`` tensors in metres. ``compute()`` returns, with ``N`` the
    number of valid pixels of the whole set, ``p`` the prediction, ``t`` the target and
    ``p' = max(p, MIN_PRED_DEPTH)``:

    - ``abs_err = sum|p - t| / N`` (m), ``rel_err = sum(|p - t| / t) / N``,
      ``rmse = sqrt(sum (p - t)^2 / N)`` (m), ``log10 = sum|log10 p' - log10 t| / N``;
    - ``delta{k} = 100 * #{max(p'/t, t/p') < 1.25^k} / N`` for k = 1, 2, 3 (percent).

    These are means over pixels, not means of per-batch means (which is what MTAN reports and which
    depends on the batch size). The state is float64 sums and int64 counts on the inputs' device.
    With no valid pixel every value is ``NaN`` (nothing raises).
    """

    keys = ("abs_err", "rel_err", "rmse", "log10", "delta1", "delta2", "delta3")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        # sums: [|p-t|, |p-t|/t, (p-t)^2, |log10 p' - log10 t|]
        self.sums = torch.zeros(4, dtype=torch.float64)
        # counts: [valid pixels, within 1.25, within 1.25^2, within 1.25^3]
        self.counts = torch.zeros(4, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Accumulate a batch: ``pred``, ``target`` ``[B,1,H,W]`` metres; pixels with ``target > 0`` count."""
        if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 1:
            raise ValueError(
                f"DepthMetric.update: expected pred and target of shape [B,1,H,W], got "
                f"{tuple(pred.shape)} and {tuple(target.shape)}"
            )
        if self.sums.device != target.device:
            self.sums = self.sums.to(target.device)
            self.counts = self.counts.to(target.device)
        t = target.double()
        valid = t > 0
        t = t[valid]
        p = pred.to(device=target.device, dtype=torch.float64)[valid]
        diff = (p - t).abs()
        pc = p.clamp_min(MIN_PRED_DEPTH)
        ratio = torch.maximum(pc / t, t / pc)
        self.sums += torch.stack([
            diff.sum(),
            (diff / t).sum(),
            (diff * diff).sum(),
            (torch.log10(pc) - torch.log10(t)).abs().sum(),
        ])
        self.counts += torch.stack([
            torch.tensor(t.numel(), device=t.device, dtype=torch.int64),
            (ratio < _DELTA_BASE).sum(),
            (ratio < _DELTA_BASE ** 2).sum(),
            (ratio < _DELTA_BASE ** 3).sum(),
        ])

    def compute(self) -> dict[str, float]:
        """Return the seven depth metrics (see the class docstring) over the whole (distributed) set."""
        sums, counts = all_reduce_sum([self.sums, self.counts])
        sums = sums.cpu().tolist()
        counts = counts.cpu().tolist()
        n = counts[0]
        if n == 0:
            return {k: math.nan for k in self.keys}
        return {
            "abs_err": sums[0] / n,
            "rel_err": sums[1] / n,
            "rmse": math.sqrt(sums[2] / n),
            "log10": sums[3] / n,
            "delta1": counts[1] / n * 100.0,
            "delta2": counts[2] / n * 100.0,
            "delta3": counts[3] / n * 100.0,
        }
