"""Gradient aggregators that draw several independent batches per step: SDMGrad and MoDo.

Both take ``K = 3`` batches per step (``batches_per_step``). The training step stacks the per-task
gradients of the shared parameters of all three, batch-major (row ``k*T + t`` is batch k, task t), and
passes their ``[3T, 3T]`` Gramian to :meth:`weights`, which returns ``[3T]`` row weights: the update is
``Σ_r w_r row_r``, so the rows of the batches that only steer the weights get weight 0. The cross-batch
blocks of the Gramian are inner products of gradients of different samples, which only exist for the
shared parameters: both methods are defined at the ``param`` level only (as in LibMTL, which asserts
``rep_grad == False`` for both).

The task weights are state (they start uniform and persist across steps, in :meth:`state_dict`). The
T-sized problem is small and sequential, so it is done in plain Python floats (IEEE float64) on the
host: SDMGrad's 20 projected-SGD iterations cost ~0.1 ms for T = 3, against ~1 ms as tiny torch ops.

Task-specific (head) parameters: each class says in ``head_reduction`` how the authors' code combines a
head's gradients over the K batches (it is the training step that applies it; see each docstring).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mtvision.registry import BALANCERS

from .aggregators import GradientAggregator

__all__ = ["MoDo", "SDMGrad"]

_K = 3


def _blocks(gram: Tensor, what: str) -> tuple[int, list[list[float]]]:
    """T and the Gramian as nested Python floats (float64), after checking its shape."""
    if not isinstance(gram, Tensor) or gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        shape = tuple(gram.shape) if isinstance(gram, Tensor) else type(gram).__name__
        raise ValueError(f"{what}.weights: expected a square Gramian [3T,3T] of the per-task gradients of "
                         f"{_K} batches (batch-major rows), got {shape}")
    n = gram.shape[0]
    if n == 0 or n % _K:
        raise ValueError(f"{what}.weights: the Gramian has {n} rows, not a positive multiple of {_K} "
                         f"(the per-task gradients of {_K} batches, batch-major)")
    return n // _K, gram.detach().to(device="cpu", dtype=torch.float64).tolist()


def _project_simplex(v: list[float]) -> list[float]:
    """Euclidean projection of ``v`` onto the probability simplex (sort-based; the same algorithm as
    :func:`~mtvision.balancing.solvers.project_simplex`, on Python floats)."""
    css = 0.0
    theta = 0.0
    for j, u in enumerate(sorted(v, reverse=True)):
        css += u
        t = (css - 1.0) / (j + 1)
        if u > t:  # the last j with u_j > (Σ_{i<=j} u_i − 1)/j gives the threshold
            theta = t
    return [max(x - theta, 0.0) for x in v]


def _row_weights(per_batch: dict[int, list[float]], T: int, gram: Tensor) -> Tensor:
    """``[3T]`` row weights: ``per_batch[k]`` on batch k's rows, 0 elsewhere; float64 for a float64
    Gramian (float32 otherwise), on the Gramian's device."""
    flat = [0.0] * (_K * T)
    for k, w in per_batch.items():
        flat[k * T:(k + 1) * T] = w
    dtype = gram.dtype if gram.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.tensor(flat, dtype=dtype, device=gram.device)


class _SimplexState(GradientAggregator):
    """Shared parts: the task weights on the simplex as state (uniform until the first step)."""

    levels = ("param",)
    batches_per_step = _K
    head_reduction = "mean"

    def __init__(self) -> None:
        self._w: list[float] | None = None

    def _current(self, T: int) -> list[float]:
        if self._w is None:
            return [1.0 / T] * T
        if len(self._w) != T:
            raise ValueError(f"{type(self).__name__}.weights: the state has {len(self._w)} task weights, "
                             f"the Gramian has {T} tasks ({_K}T = {_K * T} rows)")
        return self._w

    def _keep(self, w: list[float]) -> None:
        if all(math.isfinite(x) for x in w):  # a non-finite Gramian does not poison the state
            self._w = w

    @property
    def task_weights(self) -> Tensor | None:
        """The current T task weights (float64), or None before the first step."""
        return None if self._w is None else torch.tensor(self._w, dtype=torch.float64)

    def state_dict(self) -> dict:
        return {} if self._w is None else {"weights": torch.tensor(self._w, dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        w = state.get("weights")
        if w is None:
            self._w = None
            return
        w = torch.as_tensor(w, dtype=torch.float64)
        if w.dim() != 1 or w.numel() == 0:
            raise ValueError(f"{type(self).__name__}.load_state_dict: 'weights' must be a non-empty vector, "
                             f"got shape {tuple(w.shape)}")
        self._w = w.tolist()


@BALANCERS.register("sdmgrad")
class SDMGrad(_SimplexState):
    """SDMGrad (Xiao et al. 2023, "Direction-oriented Multi-objective Learning: Simple and Provable
    Stochastic Algorithms"), as in LibMTL's ``SDMGrad`` (adapted there from OptMN-Lab/sdmgrad).

    Batch 0 (ζ) gives the update, batches 1 and 2 (ξ, ξ') the weight subproblem. With the cross block
    ``GG = G_ξξ'`` (rows ξ, columns ξ': ``GG[i,j] = ξ_i·ξ'_j``, not symmetric) divided by
    ``mean_t sqrt(max(GG[t,t], 0))² + 1e-8`` and ``Gg`` its row means, the task weights w (state,
    uniform at first) take ``niter`` steps of SGD (learning rate ``lr``, momentum ``momentum``, the
    momentum buffer fresh every step as LibMTL builds a new ``torch.optim.SGD`` each step) on the
    gradient ``GG w + lamda Gg``, each followed by the projection onto the simplex. The update is
    ``d = (Σ_t w_t ζ_t + lamda ζ̄)/(1 + lamda)`` with ζ̄ the mean of the ζ gradients: row weights
    ``(w + lamda/T)/(1 + lamda)`` on batch 0, 0 on batches 1 and 2.

    Defaults as LibMTL (``lamda=0.3``, ``niter=20``, SGD lr 5 and momentum 0.5, hard-coded there). The
    authors' code differs in details not followed here: lr 10, ``scale = mean(sqrt(diag + 1e-4))``
    without the 1e-8, and the update multiplied by T.

    Heads (``head_reduction = "sum"``): in LibMTL and in the authors' code every one of the 3T losses is
    back-propagated into the task-specific parameters, so a head gets the sum of its gradients over
    the three batches.
    """

    head_reduction = "sum"

    def __init__(self, lamda: float = 0.3, niter: int = 20, lr: float = 5.0, momentum: float = 0.5):
        super().__init__()
        if lamda < 0:
            raise ValueError(f"SDMGrad: lamda must be >= 0, got {lamda}")
        if int(niter) != niter or niter < 0:
            raise ValueError(f"SDMGrad: niter must be a non-negative integer, got {niter!r}")
        if lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"SDMGrad: lr must be > 0 and momentum in [0, 1), got {lr}, {momentum}")
        self.lamda = float(lamda)
        self.niter = int(niter)
        self.lr = float(lr)
        self.momentum = float(momentum)

    @torch.no_grad()
    def weights(self, gram: Tensor, generator: torch.Generator | None = None) -> Tensor:
        T, G = _blocks(gram, "SDMGrad")
        w = self._current(T)
        GG = [row[2 * T:] for row in G[T:2 * T]]  # rows ξ (batch 1), columns ξ' (batch 2)
        scale = sum(math.sqrt(max(GG[t][t], 0.0)) for t in range(T)) / T
        s2 = scale * scale + 1e-8
        GG = [[x / s2 for x in row] for row in GG]
        b = [self.lamda * (sum(row) / T) for row in GG]  # lamda Gg
        lr, mom = self.lr, self.momentum
        buf: list[float] | None = None
        for _ in range(self.niter):
            g = [sum(x * y for x, y in zip(row, w)) + bt for row, bt in zip(GG, b)]
            buf = g if buf is None else [mom * u + x for u, x in zip(buf, g)]
            w = _project_simplex([x - lr * u for x, u in zip(w, buf)])
        self._keep(w)
        c = 1.0 / (1.0 + self.lamda)
        return _row_weights({0: [(x + self.lamda / T) * c for x in w]}, T, gram)


@BALANCERS.register("modo")
class MoDo(_SimplexState):
    """MoDo (Chen et al. 2023, "Three-Way Trade-Off in Multi-Objective Learning: Optimization,
    Generalization and Conflict-Avoidance"), the three-sample version of LibMTL's ``MoDo`` and of the
    authors' toy code (heshandevaka/Trade-Off-MOL, ``grad_modo`` with ``num_samples=3``).

    The task weights λ (state, uniform at first) take one projected step
    ``λ ← Π_Δ(λ − gamma (G₀₁ λ + rho λ))`` with ``G₀₁[i,j] = g⁰_i·g¹_j`` (rows batch 0, columns batch 1:
    LibMTL's ``grads[0] @ (grads[1].T @ λ)``); the update is ``Σ_t λ_t g²_t`` with the new λ: row
    weights λ on batch 2, 0 on batches 0 and 1. Defaults as LibMTL: ``gamma=1e-3``, ``rho=0.1``.

    Heads (``head_reduction = "mean"``): LibMTL divides the heads' gradients, accumulated over the three
    batches, by 3. The authors' two-sample MoDo (their LibMTL fork) updates the shared parameters with
    ``λ·(g⁰ + g¹)`` and leaves the heads' sum over the same two batches, i.e. heads and shared
    parameters on the same scale, which with one update batch is the mean here.
    """

    def __init__(self, gamma: float = 1e-3, rho: float = 0.1):
        super().__init__()
        if gamma < 0 or rho < 0:
            raise ValueError(f"MoDo: gamma and rho must be >= 0, got {gamma}, {rho}")
        self.gamma = float(gamma)
        self.rho = float(rho)

    @torch.no_grad()
    def weights(self, gram: Tensor, generator: torch.Generator | None = None) -> Tensor:
        T, G = _blocks(gram, "MoDo")
        lam = self._current(T)
        G01 = [row[T:2 * T] for row in G[:T]]  # rows batch 0, columns batch 1
        step = [sum(x * y for x, y in zip(row, lam)) + self.rho * lt for row, lt in zip(G01, lam)]
        lam = _project_simplex([lt - self.gamma * s for lt, s in zip(lam, step)])
        self._keep(lam)
        return _row_weights({2: lam}, T, gram)
