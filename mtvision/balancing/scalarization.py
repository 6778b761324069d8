"""Scalarisations: a nonlinear objective ``F(L_1, ..., L_T)`` of the task losses, trained through the
loss-weighting interface (GLS, STCH).

As with FAMO (``learned_weighting.py``), the objective is expressed as per-task weights
``w_t = dF/dL_t`` computed from the detached losses: ``sum_t w_t L_t`` then has the gradient of ``F`` with
respect to the model's parameters (its value differs from ``F``; only the logged total shows that). The
training loop drives these classes as any :class:`~mtvision.balancing.weighting.LossWeighting` (see
``weighting.py``); both expect non-negative losses (the objectives take their logarithms).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import BALANCERS
from .weighting import LossWeighting

__all__ = ["GLS", "STCH"]

_F32_MAX = torch.finfo(torch.float32).max


def _work_dtype(losses: Tensor) -> torch.dtype:
    """float32, or float64 for float64 losses (the weights are returned as float32 either way)."""
    return torch.promote_types(losses.dtype, torch.float32)


def _as_weights(w: Tensor, device: torch.device) -> Tensor:
    """float32 weights on ``device``; an overflow (only reachable with degenerate losses or nadir, see the
    classes) is clamped to the largest float32 so that ``w * L`` is never ``inf * 0 = nan``."""
    w = w.to(device=device, dtype=torch.float32)
    return torch.nan_to_num(w, nan=0.0, posinf=_F32_MAX, neginf=0.0)


@BALANCERS.register("gls")
class GLS(LossWeighting):
    """Geometric Loss Strategy (Chennupati et al., "MultiNet++", CVPR Workshops 2019).

    Objective: the geometric mean of the task losses, ``F = (prod_t L_t)^(1/T)``. ``weights`` returns
    ``w_t = dF/dL_t = F / (T L_t)``; note ``w_t L_t = F / T`` for every task, so each task contributes the
    gradient of ``log L_t`` scaled by ``F / T`` (the relative, not absolute, loss decrease counts). LibMTL's
    ``GLS`` trains on ``torch.pow(losses.prod(), 1/T)`` directly; the step here is the same.

    Zero losses: ``dF/dL_t`` is infinite at ``L_t = 0`` (for T > 1) and ``torch.pow(prod, 1/T)`` gives
    inf/nan gradients there. This class differentiates the smoothed objective
    ``F_eps = prod_t (L_t + eps)^(1/T)`` instead: ``w_t = F_eps / (T (L_t + eps))``, finite for every
    ``L >= 0`` (negative losses, not meaningful here, are treated as 0). With ``eps = 1e-20`` (the offset the
    STCH authors use in their logarithms) the weights of losses above ~1e-12 agree with the unsmoothed
    gradient to float precision; a zero loss gets a large finite weight ``F_eps / (T eps)`` (its own
    contribution ``w_t L_t`` is 0) while the other tasks' weights become small, as ``F`` does. ``F`` is formed in
    log space (``exp(mean_t log(L_t + eps))``), so ten losses of 1e6 do not overflow the product.

    Nothing to call besides ``weights``; no state.

    Args:
        num_tasks: T.
        eps: offset added to every loss in the objective (our choice; > 0).
    """

    def __init__(self, num_tasks: int, eps: float = 1e-20):
        super().__init__(num_tasks)
        if not float(eps) > 0.0:
            raise ValueError(f"GLS: eps must be > 0, got {eps!r}")
        self.eps = float(eps)

    def objective(self, task_losses: Tensor) -> Tensor:
        """``F_eps`` (differentiable): the geometric mean of ``L + eps`` (for logging / reference)."""
        self._check(task_losses)
        return torch.exp(torch.log(task_losses.clamp_min(0.0) + self.eps).mean())

    def weights(self, task_losses: Tensor) -> Tensor:
        self._check(task_losses)
        losses = task_losses.detach().to(_work_dtype(task_losses)).clamp_min(0.0) + self.eps
        logs = losses.log()
        # F / (T (L_t + eps)) = exp(mean(log L) - log L_t) / T: bounded exponents, no overflow of the product
        w = torch.exp(logs.mean() - logs) / self.num_tasks
        return _as_weights(w, task_losses.device)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, eps={self.eps}"


@BALANCERS.register("stch")
class STCH(LossWeighting):
    """Smooth Tchebycheff scalarisation (Lin, Zhang, Zhang, Liu & Liu, "Smooth Tchebycheff Scalarization for
    Multi-Objective Optimization", ICML 2024), as in the authors' MTL code (Xi-L/STCH, ``STCH_MTL``, the same
    as LibMTL's ``STCH``).

    Three phases, with ``delta = 1e-20`` (the authors' offset):

    * warm-up, epochs ``0 .. warmup_epoch - 1``: objective ``sum_t log(L_t + delta)``, i.e.
      ``w_t = 1 / (L_t + delta)``;
    * nadir epoch, epoch ``warmup_epoch``: the same objective, and the losses of the epoch's steps are
      averaged into the nadir vector ``z``;
    * afterwards: ``F = mu * T * log sum_t exp((u_t - max_s u_s) / mu)`` with
      ``u_t = log(L_t / z_t + delta)`` (the max is detached and does not change the gradient), i.e.
      ``w_t = dF/dL_t = T * softmax(u / mu)_t * (1 / z_t) / (L_t / z_t + delta)``.

    Epochs are counted as in the authors' trainer (``epoch = 0, 1, ...``; the phase is decided by
    ``epoch < / == / > warmup_epoch``), here by :meth:`end_epoch` calls: the loop calls it at every epoch
    end. So the default ``warmup_epoch = 4`` (the authors' ``--STCH_warmup_epoch``) trains epochs 0-3 on
    the warm-up objective, averages the losses of epoch 4 (itself still on the warm-up objective) and uses
    STCH from epoch 5 on; ``warmup_epoch = 0`` has no warm-up: epoch 0 is the nadir epoch and STCH starts
    at epoch 1, as in the authors' code. ``mu`` defaults to their ``--STCH_mu = 1.0``.

    Differences from the authors' code, all only where theirs fails or cannot apply:

    * The nadir epoch's losses are accumulated in :meth:`update` (after the optimiser step, with the
      losses the step trained on), so a step the loop skips (non-finite total) does not enter the mean. If
      the nadir epoch ends with no accumulated step (the authors' code divides by zero), the nadir window
      extends to the next epoch, and so on, until one step was seen; the warm-up objective is kept meanwhile.
    * The nadir is floored at ``delta = 1e-20``: a task whose loss was exactly 0 throughout the nadir epoch
      gives ``0 / 0`` in the authors' code (nan); with the floor such a task dominates the smooth max as soon
      as its loss is positive.
    * Weights that overflow float32 (only for a zero loss with a (floored) nadir below ~1e-18) are clamped
      to the largest float32, so ``w_t L_t`` stays finite (``0`` for a zero loss) and nothing becomes nan;
      negative losses (outside both objectives' domain) are taken as 0 in the weights.
    * ``warmup_iters`` (our addition, for runs shorter than an epoch): when given, the phases are counted
      in iterations (:meth:`update` calls, i.e. optimiser steps taken) instead of epochs, and
      :meth:`end_epoch` only counts epochs: steps ``0 .. warmup_iters - 1`` are warm-up, the next ``nadir_iters``
      steps (default 1, the literal "one iteration for one epoch"; also ours) are averaged into the nadir,
      and STCH applies from the step after. ``warmup_epoch`` is then unused.

    Weights are float32 on the losses' device; ``weights`` / ``update`` / ``end_epoch`` never read a
    device value back (the counters are Python integers). State in ``state_dict``: the running loss sum
    (float64) and the nadir (buffers), the epoch / iteration counters, the step count of the sum and
    whether the nadir is set (extra state, plain data).

    Args:
        num_tasks: T.
        mu: smoothing parameter (> 0); smaller is closer to the (nonsmooth) Tchebycheff max.
        warmup_epoch: epochs trained on the warm-up objective before the nadir epoch (>= 0).
        warmup_iters: if given (>= 0), count iterations instead of epochs (see above).
        nadir_iters: steps averaged into the nadir in iteration mode (>= 1; default 1; only with
            ``warmup_iters``).
    """

    DELTA = 1e-20

    def __init__(self, num_tasks: int, mu: float = 1.0, warmup_epoch: int = 4,
                 warmup_iters: int | None = None, nadir_iters: int | None = None):
        super().__init__(num_tasks)
        if not float(mu) > 0.0 or float(mu) == float("inf"):
            raise ValueError(f"STCH: mu must be finite and > 0, got {mu!r}")
        if isinstance(warmup_epoch, bool) or int(warmup_epoch) != warmup_epoch or warmup_epoch < 0:
            raise ValueError(f"STCH: warmup_epoch must be an integer >= 0, got {warmup_epoch!r}")
        if warmup_iters is not None and (isinstance(warmup_iters, bool) or int(warmup_iters) != warmup_iters
                                         or warmup_iters < 0):
            raise ValueError(f"STCH: warmup_iters must be an integer >= 0 or None, got {warmup_iters!r}")
        if nadir_iters is not None:
            if warmup_iters is None:
                raise ValueError("STCH: nadir_iters applies only with warmup_iters (iteration counting); "
                                 "in epoch counting the nadir is the mean over the epoch warmup_epoch")
            if isinstance(nadir_iters, bool) or int(nadir_iters) != nadir_iters or nadir_iters < 1:
                raise ValueError(f"STCH: nadir_iters must be an integer >= 1, got {nadir_iters!r}")
        self.mu = float(mu)
        self.warmup_epoch = int(warmup_epoch)
        self.warmup_iters = None if warmup_iters is None else int(warmup_iters)
        self.nadir_iters = None if warmup_iters is None else (1 if nadir_iters is None else int(nadir_iters))
        t = self.num_tasks
        self.register_buffer("loss_sum", torch.zeros(t, dtype=torch.float64))
        self.register_buffer("nadir", torch.zeros(t, dtype=torch.float32))
        self.epoch = 0         # end_epoch() calls so far: the index of the current epoch
        self.iteration = 0     # update() calls so far
        self.loss_count = 0    # steps in loss_sum
        self.has_nadir = False

    # -- phases -------------------------------------------------------------------------------------------

    def _accumulating(self) -> bool:
        """Whether this step's losses go into the nadir mean (the nadir window, or its extension)."""
        if self.has_nadir:
            return False
        if self.warmup_iters is not None:
            return self.iteration >= self.warmup_iters
        return self.epoch >= self.warmup_epoch

    def _set_nadir(self) -> None:
        self.nadir.copy_((self.loss_sum / self.loss_count).clamp_min(self.DELTA))
        self.has_nadir = True

    @property
    def phase(self) -> str:
        """``"warmup"``, ``"nadir"`` (warm-up objective, losses being averaged) or ``"stch"``."""
        return "stch" if self.has_nadir else ("nadir" if self._accumulating() else "warmup")

    # -- objective ----------------------------------------------------------------------------------------

    def objective(self, task_losses: Tensor) -> Tensor:
        """The objective of the current phase (differentiable; for logging / reference)."""
        self._check(task_losses)
        if not self.has_nadir:
            return torch.log(task_losses + self.DELTA).sum()
        u = torch.log(task_losses / self.nadir.to(task_losses) + self.DELTA)
        u = u - u.detach().max()
        return self.mu * self.num_tasks * torch.logsumexp(u / self.mu, dim=0)

    def weights(self, task_losses: Tensor) -> Tensor:
        self._check(task_losses)
        losses = task_losses.detach().to(_work_dtype(task_losses)).clamp_min(0.0)
        if not self.has_nadir:
            return _as_weights(1.0 / (losses + self.DELTA), task_losses.device)
        z = self.nadir.to(device=losses.device, dtype=losses.dtype)
        ratio = losses / z + self.DELTA
        soft = torch.softmax(ratio.log() / self.mu, dim=0)
        return _as_weights(self.num_tasks * soft / (z * ratio), task_losses.device)

    # -- hooks --------------------------------------------------------------------------------------------

    def update(self, task_losses: Tensor, new_task_losses: Tensor | None = None) -> None:
        self._check(task_losses)
        if self._accumulating():
            self.loss_sum.add_(task_losses.detach().to(device=self.loss_sum.device, dtype=self.loss_sum.dtype))
            self.loss_count += 1
        self.iteration += 1
        if self.warmup_iters is not None and not self.has_nadir and self.loss_count >= self.nadir_iters:
            self._set_nadir()

    def end_epoch(self) -> None:
        if self.warmup_iters is None and self._accumulating() and self.loss_count > 0:
            self._set_nadir()
        self.epoch += 1

    # -- state --------------------------------------------------------------------------------------------

    def get_extra_state(self) -> dict:
        return {"epoch": self.epoch, "iteration": self.iteration, "loss_count": self.loss_count,
                "has_nadir": self.has_nadir}

    def set_extra_state(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.iteration = int(state["iteration"])
        self.loss_count = int(state["loss_count"])
        self.has_nadir = bool(state["has_nadir"])

    def extra_repr(self) -> str:
        unit = (f"warmup_iters={self.warmup_iters}, nadir_iters={self.nadir_iters}"
                if self.warmup_iters is not None else f"warmup_epoch={self.warmup_epoch}")
        return f"num_tasks={self.num_tasks}, mu={self.mu}, {unit}"
