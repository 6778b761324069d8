"""Task balancing: loss weighting (EW, UW, DWA, GradNorm, RLW, FAMO, GLS, STCH) and gradient methods on the
per-task gradients (PCGrad, MGDA, CAGrad, Nash-MTL, IMTL-G, Aligned-MTL, UPGrad, ConFIG, DualProj, FairGrad,
GradVac from their Gramian; DB-MTL, MoCo, ExcessMTL with per-task gradient state; GradDrop element-wise;
SDMGrad and MoDo on three batches a step).

Every method is registered in ``mtvision.registry.BALANCERS`` under its config name (``balancer.name``).
``build_balancer(name, num_tasks, **kw)`` gives the method: a :class:`LossWeighting` (an ``nn.Module``
deciding per-task loss weights) or a :class:`GradientAggregator` (weights from the T x T Gramian, usable
as ``aggregate(grads [T,P]) -> [P]``). The training loop drives either through one interface,
:class:`Balancer` (``build_task_balancer``; ``step.py``, ``gradient_step.py``).
"""

from __future__ import annotations

from ..registry import BALANCERS
from .aggregators import (AlignedMTL, CAGrad, ConFIG, DualProj, FairGrad, GradientAggregator, GradVac, IMTLG,
                          MGDA, NashMTL, PCGrad, UPGrad)
from .gradient_state import DBMTL, ExcessMTL, GradDrop, MoCo
from .gradient_step import GradientBalancer, GradientCombination
from .step import Balancer, BalanceResult, Forward, LossWeightingBalancer, build_task_balancer
from .learned_weighting import FAMO, GradNorm
from .multi_sample import MoDo, SDMGrad
from .scalarization import GLS, STCH
from .weighting import DWA, EW, RLW, UW, LossWeighting

__all__ = [
    "AGGREGATORS", "BALANCERS", "AlignedMTL", "Balancer", "BalanceResult", "CAGrad", "ConFIG", "DBMTL",
    "DWA", "DualProj", "EW", "ExcessMTL", "FAMO", "FairGrad", "Forward", "GLS", "GradDrop", "GradNorm",
    "GradVac", "GradientAggregator", "GradientBalancer", "GradientCombination", "IMTLG", "LOSS_WEIGHTINGS",
    "LossWeighting", "LossWeightingBalancer", "MGDA", "MoCo", "MoDo", "NashMTL", "PCGrad", "RLW", "SDMGrad",
    "STCH", "UPGrad", "UW", "build_balancer", "build_task_balancer", "is_gradient_method",
]

#: The built-in loss weightings and gradient methods by config name (views of ``BALANCERS`` at import).
LOSS_WEIGHTINGS = {n: c for n, c in BALANCERS.items()
                   if isinstance(c, type) and issubclass(c, LossWeighting)}
AGGREGATORS = {n: c for n, c in BALANCERS.items()
               if isinstance(c, type) and issubclass(c, GradientAggregator)}


def is_gradient_method(name: str) -> bool:
    """True for the methods that need per-task gradients (they work on the Gramian)."""
    cls = BALANCERS.get(name)
    return isinstance(cls, type) and issubclass(cls, GradientAggregator)


def build_balancer(name: str, num_tasks: int, **kw):
    """The balancing method ``name`` for ``num_tasks`` tasks, with its keyword arguments ``kw``: a
    ``LossWeighting`` subclass is built as ``cls(num_tasks, **kw)``, a ``GradientAggregator`` as
    ``cls(**kw)``. Raises ConfigError (a ValueError) naming ``balancer.name`` / ``balancer.kwargs.<arg>``
    for an unknown method or argument."""
    from ..registry import check_kwargs

    cls = BALANCERS.lookup(name, "balancer.name")
    what = f"balancing method {name!r}"
    gradient = isinstance(cls, type) and issubclass(cls, GradientAggregator)
    if not gradient and not (isinstance(cls, type) and issubclass(cls, LossWeighting)):
        raise ValueError(f"balancer.name: {name!r} is registered as {cls!r}, which is neither a "
                         "LossWeighting nor a GradientAggregator subclass")
    check_kwargs(cls, kw, "balancer.kwargs", what, injected=() if gradient else ("num_tasks",))
    try:
        return cls(**kw) if gradient else cls(num_tasks, **kw)
    except TypeError as exc:
        raise ValueError(f"balancer.kwargs: {exc} (method {name!r})") from exc
