"""Gradient methods that need more than the Gramian: per-task state the size of the shared gradients
(DB-MTL, MoCo, ExcessMTL: ``T × P`` numbers, as many bytes again as the step's per-task gradient buffers),
or an element-wise combination (GradDrop).

They run in the same training step as the Gramian methods (``gradient_step.GradientBalancer``): the
per-task gradients are averaged across processes first, so the state is the same on every process and
the update equals one process's on the global batch. :meth:`prepare` works on the device without a
host synchronisation; the T-sized arithmetic runs on the host with the Gramian. The state is in
``state_dict`` (tensors; a resumed run continues bit for bit). The ``T × P`` states are defined on the
shared parameters only (``levels = ("param",)``): at the representation level the gradients are
per-sample features of a new batch every step, so an average over steps means nothing.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..distributed import dist_ready
from ..ops import excess_risk_step, gram_matrix, sign_dropout_sum
from ..registry import BALANCERS
from .aggregators import GradientAggregator, _check_gram, _gram64, _out

__all__ = ["DBMTL", "ExcessMTL", "GradDrop", "MoCo"]


def _zeros_like_all(tensors: list[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(t) for t in tensors]


def _state_to(state: Optional[list[Tensor]], like: list[Tensor]) -> list[Tensor]:
    """The method's ``T × P`` state on the gradients' device (zeros on first use); a restored state
    must have the gradients' shapes."""
    if state is None:
        return _zeros_like_all(like)
    if len(state) != len(like) or any(s.shape != g.shape for s, g in zip(state, like)):
        raise ValueError("the saved per-task gradient state does not match this model's shared parameters "
                         f"({len(state)} tensors saved, {len(like)} expected)")
    if state[0].device != like[0].device or state[0].dtype != like[0].dtype:
        state = [s.to(g.device, g.dtype) for s, g in zip(state, like)]
    return state


def _row_shaped(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


class _GradientState(GradientAggregator):
    """Shared by the methods with per-task gradient state: the step count and the state tensors named in
    ``_state_names`` (``T × P`` lists or small tensors), in ``state_dict``."""

    levels = ("param",)
    _state_names: tuple[str, ...] = ()

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        state: dict = {"step": self.step}
        for name in self._state_names:
            value = getattr(self, name)
            if value is not None:
                state[name] = ([t.detach().clone() for t in value] if isinstance(value, list)
                               else value.clone())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        for name in self._state_names:
            if name in state:
                value = state[name]
                # copies: the state is updated in place, and the caller's dict must not change with it
                setattr(self, name, [t.clone() for t in value] if isinstance(value, (list, tuple))
                        else value.clone())


@BALANCERS.register("dbmtl")
class DBMTL(_GradientState):
    """DB-MTL (Lin et al. 2023, "Dual-Balancing Multi-Task Learning"): loss-scale balancing by taking the
    gradients of ``log(L_t + 1e-8)``, and gradient-magnitude balancing: an EMA of each task's gradient
    ``ĝ_t ← g_t + β_k (ĝ_t − g_t)`` with ``β_k = beta / k^beta_sigma`` at step k (ĝ starts at 0), and
    the update ``Σ_t (max_s |ĝ_s|)/(|ĝ_t| + 1e-8) ĝ_t``: every task's EMA rescaled to the largest norm.

    As the authors' code (LibMTL's ``DB_MTL``, kwargs ``DB_beta``/``DB_beta_sigma``): ``beta=0.9``,
    ``beta_sigma=0``; the tasks' own parameters get the gradient of their log-loss (taken at the loss
    averaged over processes, so that DDP equals one process on the global batch). State: the ``T × P``
    EMA (memory: one more copy of the per-task gradient buffers) and the step.
    """

    _state_names = ("ema",)

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0):
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"DBMTL: beta must be in [0, 1], got {beta}")
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.ema: Optional[list[Tensor]] = None

    def task_losses(self, losses: Tensor, mean_losses: Tensor) -> Tensor:
        return losses / (mean_losses.detach().to(losses.dtype) + 1e-8)  # the gradient of log(L + 1e-8)

    def prepare(self, grads, losses):
        self.step += 1
        keep = self.beta / self.step ** self.beta_sigma
        self.ema = _state_to(self.ema, grads)
        torch._foreach_lerp_(self.ema, grads, 1.0 - keep)  # ĝ + (1-β_k)(g - ĝ) = g + β_k(ĝ - g)
        return self.ema, None

    @torch.no_grad()
    def weights(self, gram: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_gram(gram)
        norms = _gram64(gram).diagonal().clamp_min(0).sqrt()
        return _out(norms.max() / (norms + 1e-8), gram)


@BALANCERS.register("moco")
class MoCo(_GradientState):
    """MoCo (Fernando et al., ICLR 2023, "Mitigating Gradient Bias in Multi-objective Learning"): a
    tracked per-task gradient ``y_t ← y_t − β_k (y_t − L_t g_t/(|g_t| + 1e-8))`` (y starts at 0) and
    weights ``λ ← softmax(λ − γ_k (Y Yᵀ + ρ I) λ)`` (λ starts at 1/T) with ``β_k = beta / k^beta_sigma``,
    ``γ_k = gamma / k^gamma_sigma``; the update is ``Σ_t λ_t y_t``.

    As the code the authors shared with LibMTL (``MoCo``; kwargs ``MoCo_beta`` ...): the gradients are
    normalised and scaled by the loss before tracking, ``beta=0.5, beta_sigma=0.5, gamma=0.1,
    gamma_sigma=0.5, rho=0``. The losses are those averaged across processes. State: the ``T × P``
    tracked gradients (memory: one more copy of the per-task gradient buffers), λ and the step.
    """

    _state_names = ("tracked", "lambd")

    def __init__(self, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1,
                 gamma_sigma: float = 0.5, rho: float = 0.0):
        super().__init__()
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.gamma, self.gamma_sigma, self.rho = float(gamma), float(gamma_sigma), float(rho)
        self.tracked: Optional[list[Tensor]] = None
        self.lambd: Optional[Tensor] = None

    def prepare(self, grads, losses):
        if losses is None:
            raise ValueError("MoCo needs the task losses (prepare(grads, losses))")
        self.step += 1
        norms = gram_matrix(grads).diagonal().clamp_min(0).sqrt()
        scale = (losses.to(norms.dtype) / (norms + 1e-8)).to(grads[0].dtype)
        torch._foreach_mul_(grads, [_row_shaped(scale, g) for g in grads])
        self.tracked = _state_to(self.tracked, grads)
        torch._foreach_lerp_(self.tracked, grads, self.beta / self.step ** self.beta_sigma)
        return self.tracked, None

    @torch.no_grad()
    def weights(self, gram: Tensor, generator: torch.Generator | None = None) -> Tensor:
        T = _check_gram(gram)
        G = _gram64(gram)
        if self.lambd is None:
            self.lambd = torch.full((T,), 1.0 / T, dtype=torch.float64)
        if self.lambd.shape != (T,):
            raise ValueError(f"MoCo: the state has {self.lambd.numel()} tasks, the Gramian {T}")
        step = max(self.step, 1)
        rate = self.gamma / step ** self.gamma_sigma
        lam = self.lambd.to(G.device, torch.float64)
        A = G + self.rho * torch.eye(T, dtype=G.dtype, device=G.device)
        self.lambd = torch.softmax(lam - rate * (A @ lam), 0)
        return _out(self.lambd, gram)


@BALANCERS.register("excessmtl")
class ExcessMTL(_GradientState):
    """ExcessMTL (He et al., ICML 2024, "Robust Multi-Task Learning with Excess Risks"): task weights
    that grow with each task's estimated excess risk. With the AdaGrad-style accumulator
    ``A_t += g_t²`` (element-wise, ``T × P`` state), the estimate is ``e_t = Σ g_t² / sqrt(A_t + 1e-7)``
    (a diagonal-Hessian ``gᵀH⁻¹g``); the first step's ``e`` is kept as ``e⁰`` and later steps update
    ``w ← w · exp(robust_step_size · e/e⁰)``, renormalised to sum T (w starts at 1). The loss is
    ``Σ_t w_t L_t``, so the shared parameters get ``Σ_t w_t g_t`` and each task's own parameters its
    gradient times ``w_t``.

    As the authors' code (their LibMTL ``ExcessMTL``): ``robust_step_size=1e-2``, the weights of the
    first step are 1, the step's loss uses the weights updated with that step's gradients. A task whose
    ``e⁰`` is 0 (a zero gradient at the first step) gets ratio 0 (theirs divides by 0). State: the
    ``T × P`` accumulator (memory: one more copy of the per-task gradient buffers), ``e⁰``, ``w``.
    """

    weights_task_params = True
    _state_names = ("accumulator", "initial", "loss_weights")

    def __init__(self, robust_step_size: float = 1e-2):
        super().__init__()
        self.robust_step_size = float(robust_step_size)
        self.accumulator: Optional[list[Tensor]] = None
        self.initial: Optional[Tensor] = None
        self.loss_weights: Optional[Tensor] = None

    def prepare(self, grads, losses):
        self.step += 1
        self.accumulator = [a.contiguous() for a in _state_to(self.accumulator, grads)]
        # A += g² and Σ g² / sqrt(A + 1e-7) per task, in one pass over the T × P buffers
        excess = excess_risk_step(grads, self.accumulator, 1e-7)
        return grads, excess

    @torch.no_grad()
    def weights_from(self, gram: Tensor, stats: Tensor | None, generator=None) -> Tensor:
        T = _check_gram(gram)
        if stats is None or stats.shape != (T,):
            raise ValueError("ExcessMTL.weights_from needs prepare's [T] excess-risk estimates")
        excess = stats.to(torch.float64)
        if self.loss_weights is None:
            self.loss_weights = torch.ones(T, dtype=torch.float64)
        if self.initial is None:
            self.initial = excess.clone()
        else:
            ok = self.initial > 0
            ratio = torch.where(ok, excess / torch.where(ok, self.initial, 1.0), 0.0)
            w = self.loss_weights * torch.exp(self.robust_step_size * ratio)
            self.loss_weights = w / w.sum() * T
        return _out(self.loss_weights, gram)

    def weights(self, gram: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise TypeError("ExcessMTL's weights need the gradients themselves, not only their Gramian: use "
                        "aggregate(grads) or the training step")


@BALANCERS.register("graddrop")
class GradDrop(GradientAggregator):
    """GradDrop (Chen et al., NeurIPS 2020, "Just Pick a Sign: Optimizing Deep Multitask Models with
    Gradient Sign Dropout"). Per coordinate, the sign purity ``P = ½(1 + Σ_t g_t / Σ_t |g_t|)`` and a
    uniform draw U: task t's value is kept when ``P > U`` and ``g_t > 0`` or ``P < U`` and ``g_t < 0``;
    the update is ``Σ_t g_t (leak + (1 − leak) M_t)``.

    ``level="rep"`` is the paper's (and LibMTL's, the only level it allows): the coordinates are the
    shared features'; ``g_t`` for the purity is the feature gradient times the sign of the feature,
    summed over the batch (across processes under DDP), and the mask of a feature coordinate applies to
    every sample. ``level="param"``: the coordinates are the shared parameters', each gradient as it is
    (one pass in ``mtvision.ops.sign_dropout_sum``, with counter-based draws from a seed).
    ``leak`` (default 0.0) as LibMTL's. LibMTL adds 1e-7 to the purity's denominator; here a coordinate
    whose gradients are all 0 gets ``P = ½`` instead (it contributes 0 either way), so that P does not
    depend on the loss scale (fp16's GradScaler multiplies every gradient by it). The draws come from
    the training step's host generator (seeded from ``seed``, in checkpoints), so a run is reproducible
    and every process draws the same U. The combination is not a weighted sum: the
    logged weights are 1 and ``train.grad_clip`` clips after the backward.
    """

    stochastic = True
    linear = False

    def __init__(self, leak: float = 0.0):
        if not 0.0 <= leak <= 1.0:
            raise ValueError(f"GradDrop: leak must be in [0, 1], got {leak}")
        self.leak = float(leak)

    @torch.no_grad()
    def weights(self, gram: Tensor, generator: torch.Generator | None = None) -> Tensor:
        T = _check_gram(gram)
        return _out(torch.ones(T, dtype=torch.float64), gram)

    @torch.no_grad()
    def combine(self, rows, weights, out, generator=None, inputs=None) -> None:
        if inputs is None:
            self._combine_params(rows, out, generator)
        else:
            self._combine_features(rows, out, generator, inputs)

    def _combine_params(self, rows, out, generator) -> None:
        # one pass over the T x P gradients in the custom op, whose draws come from a seed (a generator
        # on the host: no tensor of T x P/T draws, no wait for the device)
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        sign_dropout_sum(rows, seed, self.leak, out=out)

    def _combine_features(self, rows, out, generator, inputs) -> None:
        acc = torch.promote_types(rows[0].dtype, torch.float32)
        signed = [(r * x.sign().unsqueeze(0)).sum(1, dtype=acc) for r, x in zip(rows, inputs)]
        if dist_ready():  # the purity is over the global batch: every process then draws the same masks
            flat = torch.cat([s.reshape(-1) for s in signed])
            torch.distributed.all_reduce(flat)
            signed = [v.view(s.shape) for v, s in zip(torch.split(flat, [s.numel() for s in signed]), signed)]
        sizes = [s[0].numel() for s in signed]
        u_all = torch.rand(sum(sizes), generator=generator).to(rows[0].device, non_blocking=True)
        draws = [v.view(s.shape[1:]) for v, s in zip(torch.split(u_all, sizes), signed)]
        for r, s, u, o in zip(rows, signed, draws, out):
            mass = s.abs().sum(0)
            purity = 0.5 * (1.0 + s.sum(0) / torch.where(mass > 0, mass, 1.0))
            mask = ((purity > u) & (s > 0)) | ((purity < u) & (s < 0))  # [T, C, H, W]
            keep = self.leak + (1.0 - self.leak) * mask.to(acc)
            o.copy_((r * keep.unsqueeze(1).to(r.dtype)).sum(0))
