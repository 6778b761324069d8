"""Task balancing: loss weighting (EW, UW, DWA, GradNorm, RLW, FAMO) and gradient aggregation on the
per-task gradient Gramian (PCGrad, MGDA, CAGrad, Nash-MTL, IMTL-G, Aligned-MTL, UPGrad).

``build_balancer(name, num_tasks, **kw)`` gives a :class:`LossWeighting` (an ``nn.Module`` deciding
per-task loss weights) or a :class:`GradientAggregator` (weights from the T x T Gramian, usable as
``aggregate(grads [T,P]) -> [P]``). The training loop for both is ``mtvision.engine.balanced_step``.
"""

from __future__ import annotations

from .aggregators import AGGREGATORS, AlignedMTL, CAGrad, GradientAggregator, IMTLG, MGDA, NashMTL, PCGrad, UPGrad
from .weighting import DWA, EW, FAMO, LOSS_WEIGHTINGS, RLW, UW, GradNorm, LossWeighting

__all__ = [
    "AGGREGATORS", "BALANCERS", "DWA", "EW", "FAMO", "GradNorm", "GradientAggregator", "IMTLG",
    "LOSS_WEIGHTINGS", "LossWeighting", "MGDA", "NashMTL", "PCGrad", "RLW", "UPGrad", "UW", "AlignedMTL",
    "CAGrad", "build_balancer", "is_gradient_method",
]

#: Every method by its config name (``balancer.name``).
BALANCERS = {**LOSS_WEIGHTINGS, **AGGREGATORS}


def is_gradient_method(name: str) -> bool:
    """True for the methods that need per-task gradients (they work on the Gramian)."""
    return name in AGGREGATORS


def build_balancer(name: str, num_tasks: int, **kw):
    """The balancing method ``name`` for ``num_tasks`` tasks, with its keyword arguments ``kw``.

    Raises ValueError naming ``balancer.name`` / ``balancer.kwargs`` for an unknown method or argument.
    """
    if name not in BALANCERS:
        raise ValueError(f"balancer.name: unknown method {name!r} (choose from: {', '.join(BALANCERS)})")
    try:
        if name in LOSS_WEIGHTINGS:
            return LOSS_WEIGHTINGS[name](num_tasks, **kw)
        return AGGREGATORS[name](**kw)
    except TypeError as exc:
        raise ValueError(f"balancer.kwargs: {exc} (method {name!r})") from exc
