"""Gradient-aggregation methods, each as T weights computed from the T×T Gramian of the task gradients.

Every method is a class with

- ``weights(gram [T,T], generator=None) -> [T]`` — the task weights, on the Gramian's device, float64
  for a float64 Gramian and float32 otherwise; computed in float64 from the small matrix alone, with
  fixed iteration counts and no ``.item()`` (no host synchronisation; the exceptions are the
  eigendecompositions of Aligned-MTL and ConFIG, whose error checks read a flag on CUDA); on CPU some
  solvers stop early once converged or run their small loops in NumPy (FairGrad);
- ``aggregate(grads, generator=None) -> [P]`` — ``weighted_sum(grads, weights(gram_matrix(grads)))``,
  where ``grads`` is ``[T,P]`` or a list of per-parameter ``[T,...]`` chunks (then a list of chunks
  comes back). So the aggregate is always a combination of the task gradients that were passed.

Which gradients are passed is the caller's choice: per-task gradients of the shared parameters, or of
the shared representation (the "-UB" variants, e.g. MGDA-UB of Sener & Koltun 2018, are these same
methods applied to the gradients w.r.t. the encoder output, and the weights then multiply the task
losses). Nothing here depends on that choice.

Implemented from the papers' definitions; where a paper leaves a choice open the authors' released
code was followed, as each docstring says.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtvision.balancing import solvers
from mtvision.ops import gram_matrix, weighted_sum
from mtvision.registry import BALANCERS

__all__ = [
    "IMTLG",
    "MGDA",
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "FairGrad",
    "GradVac",
    "GradientAggregator",
    "NashMTL",
    "PCGrad",
    "UPGrad",
]


def _check_gram(gram: Tensor) -> int:
    if not isinstance(gram, Tensor) or gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        shape = tuple(gram.shape) if isinstance(gram, Tensor) else type(gram).__name__
        raise ValueError(f"weights: expected a square Gramian [T,T], got {shape}")
    if gram.shape[0] == 0:
        raise ValueError("weights: the Gramian has no task (T = 0)")
    return gram.shape[0]


def _out(w: Tensor, gram: Tensor) -> Tensor:
    dtype = gram.dtype if gram.dtype in (torch.float32, torch.float64) else torch.float32
    return w.to(dtype)


def _gram64(gram: Tensor) -> Tensor:
    g = gram.detach().to(torch.float64)
    return 0.5 * (g + g.T)


class GradientAggregator:
    """Base class: subclasses implement :meth:`weights`.

    The training step (``gradient_step.GradientBalancer``) calls, per step: :meth:`task_losses` (the
    losses whose gradients are taken), :meth:`prepare` (stateful methods update their per-task state
    from the gradients and say which rows to combine), :meth:`weights_from` (the T×T problem, on the
    host) and :meth:`combine`. The class attributes say what the step must do for the method.
    """

    #: True for methods whose weights depend on random draws (they use the ``generator``).
    stochastic: bool = False
    #: Levels the method is defined at (``"param"``: shared parameters, ``"rep"``: shared features).
    levels: tuple[str, ...] = ("param", "rep")
    #: Independent batches one step draws (SDMGrad, MoDo: 3). With K > 1 the rows are the K batches'
    #: per-task gradients, batch-major (``K*T`` rows), and :meth:`weights` gets their ``[KT,KT]`` Gramian.
    batches_per_step: int = 1
    #: With K > 1: a task's own (head) parameters get the ``"mean"`` or the ``"sum"`` of its K gradients.
    head_reduction: str = "mean"
    #: The update is ``weighted_sum(rows, weights)``; False for an element-wise :meth:`combine` (then the
    #: combined gradient's norm is not ``wᵀGw`` and clipping is not folded into the weights).
    linear: bool = True
    #: The weights also scale each task's own parameters' gradients (methods that weight the losses, like
    #: ExcessMTL); otherwise a task's parameters get its unweighted gradient.
    weights_task_params: bool = False

    def task_losses(self, losses: Tensor, mean_losses: Tensor) -> Tensor:
        """The per-task objectives ``[T]`` whose gradients are taken (graph alive): the losses themselves
        by default. A method that transforms the losses with f returns ``f'(mean_losses) * losses``: the
        gradient of f at the losses averaged over processes, so that the update equals one process's on
        the global batch (DB-MTL: ``losses / (mean_losses + 1e-8)``, the gradient of ``log(L + 1e-8)``)."""
        return losses

    def prepare(self, grads: list[Tensor], losses: Tensor) -> tuple[list[Tensor], Tensor | None]:
        """Before the Gramian: ``grads`` are the per-task gradients (``[T,...]`` chunks, averaged across
        processes), ``losses`` the ``[T]`` losses averaged across processes (detached, on the device).
        Returns the rows to combine (``grads`` by default; a method with per-task state returns its own
        buffers) and an optional small tensor of statistics that comes to the host with the Gramian and
        is passed to :meth:`weights_from`. Must not synchronise with the device."""
        return grads, None

    def weights(self, gram: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Task weights [T] from the Gramian ``gram`` [T,T] of the task gradients."""
        raise NotImplementedError

    def weights_from(self, gram: Tensor, stats: Tensor | None, generator: torch.Generator | None = None
                     ) -> Tensor:
        """The weights given :meth:`prepare`'s host ``stats`` too; :meth:`weights` by default."""
        return self.weights(gram, generator)

    def combine(self, rows: list[Tensor], weights: Tensor, out: list[Tensor],
                generator: torch.Generator | None = None, inputs: list[Tensor] | None = None) -> None:
        """Write the update into ``out`` (one tensor per chunk of ``rows``): ``weighted_sum`` by default.
        ``generator``: the step's host (CPU) generator, as for :meth:`weights`; ``inputs`` are the shared
        features at the ``rep`` level (``None`` at the ``param`` level)."""
        weighted_sum(rows, weights, out=out)

    def state_dict(self) -> dict:
        """The method's state across steps (plain data and tensors; empty for stateless methods)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""

    def aggregate(self, grads: Tensor | Sequence[Tensor], generator: torch.Generator | None = None,
                  losses: Tensor | None = None) -> Tensor | list[Tensor]:
        """Aggregated gradient: ``[P]`` for ``grads`` [T,P], or a list of ``[...]`` chunks for a list
        of ``[T,...]`` chunks; one step of the method (``prepare``, ``weights_from``, ``combine``), as
        the training step takes it. ``losses`` [T]: for the methods whose ``prepare`` reads them."""
        chunks = [grads] if isinstance(grads, Tensor) else list(grads)
        if type(self).prepare is not GradientAggregator.prepare:  # it may work in place (MoCo scales rows)
            chunks = [c.clone() for c in chunks]
        rows, stats = self.prepare(chunks, losses)
        w = self.weights_from(gram_matrix(rows), stats, generator)
        out = [r.new_empty(r.shape[1:]) for r in rows]
        self.combine(rows, w.to(rows[0].device), out, generator)
        return out[0] if isinstance(grads, Tensor) else out

    __call__ = aggregate

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


@BALANCERS.register("pcgrad")
class PCGrad(GradientAggregator):
    """PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning"), Algorithm 1.

    For each task i, in a random order of the other tasks j, ``g_i ← g_i − min(g_i·g_j, 0)/|g_j|² g_j``
    (always against the *original* g_j); the result is ``Σ_i g_i``. Every projection is linear in the
    gradients, so each projected g_i is tracked as a coefficient vector over the original gradients and
    the T weights come from the Gramian alone: ``g_i·g_j = c_iᵀ G e_j``.

    Choices: an independent uniformly random order per task i, excluding i itself (the paper's
    "for all T_j ∈ B \\ T_i in random order"); ``reduction="sum"`` as in the paper and the authors'
    TensorFlow code (``"mean"`` divides by T). Randomness: ``generator`` (any device; None uses the
    default generator of the Gramian's device). A zero g_j is skipped.
    """

    stochastic = True

    def __init__(self, reduction: str = "sum"):
        if reduction not in ("sum", "mean"):
            raise ValueError(f"PCGrad: reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction

    @staticmethod
    def task_orders(num_tasks: int, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> Tensor:
        """[T, T-1] int64: row i is the random order in which task i is projected on the others."""
        gen_dev = generator.device if generator is not None else device
        keys = torch.rand(num_tasks, num_tasks, generator=generator, device=gen_dev)
        keys.fill_diagonal_(2.0)  # the task itself sorts last and is cut off
        return keys.argsort(-1)[:, : num_tasks - 1].to(device)

    @torch.no_grad()
    def weights(self, gram: Tensor, generator: torch.Generator | None = None) -> Tensor:
        T = _check_gram(gram)
        G = _gram64(gram)
        orders = self.task_orders(T, generator, G.device)
        diag = G.diagonal()
        C = torch.eye(T, dtype=G.dtype, device=G.device)  # row i: coefficients of the projected g_i
        for s in range(T - 1):
            j = orders[:, s]
            dots = (C * G.index_select(0, j)).sum(-1)  # g_i^PC · g_{j_i}
            dj = diag.index_select(0, j)
            coef = torch.where(dj > 0, dots.clamp(max=0) / torch.where(dj > 0, dj, 1.0), 0.0)
            C = C.scatter_add(1, j[:, None], -coef[:, None])
        w = C.sum(0)
        if self.reduction == "mean":
            w = w / T
        return _out(w, gram)


@BALANCERS.register("mgda")
class MGDA(GradientAggregator):
    """MGDA (Sener & Koltun 2018, "Multi-Task Learning as Multi-Objective Optimization").

    Weights ``α = argmin_{α ∈ Δ} |Σ α_t g_t|²``: the min-norm point of the convex hull of the task
    gradients (a zero gradient makes it 0). ``solver="active_set"`` (default) solves the QP exactly
    (:func:`~mtvision.balancing.solvers.min_norm_simplex`); ``"frank_wolfe"`` runs the paper's
    Algorithm 2 for ``iters`` iterations (default 250, the authors' MAX_ITER), from the best pair as
    in the authors' code.

    ``normalization``: the paper solves on the raw gradients (``"none"``, default). The authors' code
    optionally normalises each gradient first and then applies the weights to the *unnormalised*
    losses; ``"l2"`` does that with ``g_t/|g_t|`` (their loss-based ``"loss"``/``"loss+"`` need the
    losses, not available from the Gramian). MGDA-UB is this class applied to gradients w.r.t. the
    shared representation (see the module docstring).
    """

    def __init__(self, normalization: str = "none", solver: str = "active_set", iters: int | None = None):
        if normalization not in ("none", "l2"):
            raise ValueError(f"MGDA: normalization must be 'none' or 'l2', got {normalization!r}")
        if solver not in ("active_set", "frank_wolfe"):
            raise ValueError(f"MGDA: solver must be 'active_set' or 'frank_wolfe', got {solver!r}")
        self.normalization = normalization
        self.solver = solver
        self.iters = iters

    @torch.no_grad()
    def weights(self, gram: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_gram(gram)
        G = _gram64(gram)
        if self.normalization == "l2":
            n = G.diagonal().clamp_min(0).sqrt()
            n = torch.where(n > 0, n, 1.0)
            G = G / (n[:, None] * n[None, :])
        if self.solver == "frank_wolfe":
            w = solvers.min_norm_simplex_fw(G, iters=250 if self.iters is None else self.iters)
        else:
            w = solvers.min_norm_simplex(G, max_iter=self.iters)
        return _out(w, gram)


@BALANCERS.register("cagrad")
class CAGrad(GradientAggregator):
    """CAGrad (Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning").

    ``d = argmax_d min_i g_i·d`` s.t. ``|d − g_0| <= c|g_0|``, ``g_0`` the mean gradient, through its
    dual on the simplex: ``w = argmin_{w ∈ Δ} g_wᵀg_0 + φ sqrt(|g_w|² + ε)`` with ``g_w = Σ w_i g_i``,
    ``φ = c|g_0|``, then ``d = g_0 + φ/|g_w| g_w``. As in the authors' code (``cagrad()`` in
    Cranial-XIX/CAGrad): the sqrt is smoothed by ε (1e-8, here relative to the mean squared gradient
    norm so the weights do not depend on the gradients' scale), the dual starts from the uniform
    weights, and ``rescale`` divides d by ``1 + c²`` (1, default), ``1 + c`` (2) or nothing (0).
    Default ``c = 0.4`` (the authors' NYUv2 setting). The authors' scripts then multiply d by T to
    match a sum-of-losses baseline; here d is on the mean-gradient scale of the paper, so ``c = 0``
    gives exactly the mean gradient. Where the dual optimum has ``g_w = 0`` (e.g. a zero task
    gradient) the recovery formula gives ``d = g_0``, as the authors' code does.

    The dual is solved with :func:`~mtvision.balancing.solvers.simplex_newton` (``iters`` projected
    Newton steps) instead of scipy's SLSQP.
    """

    def __init__(self, c: float = 0.4, rescale: int = 1, iters: int = 20, eps: float = 1e-8):
        if c < 0:
            raise ValueError(f"CAGrad: c must be >= 0, got {c}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"CAGrad: rescale must be 0, 1 or 2, got {rescale}")
        self.c = float(c)
        self.rescale = rescale
        self.iters = iters
        self.eps = float(eps)

    def dual_weights(self, gram: Tensor) -> Tensor:
        """The dual solution ``w`` [T] (float64, on the simplex), before ``d`` is recovered from it."""
        G, b, phi = self._problem(gram)
        return self._solve(G, b, phi)

    def _problem(self, gram: Tensor):
        G = _gram64(gram)
        s = G.diagonal().mean()
        G = G / torch.where(s > 0, s, torch.ones_like(s))
        b = G.mean(1)  # G u with u = 1/T: g_i · g_0
        phi = self.c * G.mean().clamp_min(0).sqrt()  # c |g_0|
        return G, b, phi

    def _solve(self, G: Tensor, b: Tensor, phi: Tensor) -> Tensor:
        T = G.shape[0]
        eps = self.eps

        def fun(W: Tensor) -> Tensor:
            return W @ b + phi * (((W @ G) * W).sum(-1).clamp_min(0) + eps).sqrt()

        def grad_hess(w: Tensor):
            Gw = G @ w
            n = ((w @ Gw).clamp_min(0) + eps).sqrt()
            g = b + phi * Gw / n
            H = phi * (G / n - torch.outer(Gw, Gw) / n**3)
            return g, H

        w0 = torch.full((T,), 1.0 / T, dtype=G.dtype, device=G.device)
        return solvers.simplex_newton(fun, grad_hess, w0, iters=self.iters)

    @torch.no_grad()
    def weights(self, gram: Tensor, generator: torch.Generator | None = None) -> Tensor:
        T = _check_gram(gram)
        if self.c == 0:
            return _out(torch.full((T,), 1.0 / T, dtype=torch.float64, device=gram.device), gram)
        G, b, phi = self._problem(gram)
        w = self._solve(G, b, phi)
        gw_norm = ((w @ G @ w).clamp_min(0) + self.eps).sqrt()
        weights = 1.0 / T + (phi / gw_norm) * w
        if self.rescale == 1:
            weights = weights / (1.0 + self.c**2)
        elif self.rescale == 2:
            weights = weights / (1.0 + self.c)
        return _out(weights, gram)


@BALANCERS.register("nashmtl")
class NashMTL(GradientAggregator):
    """Nash-MTL (Navon et al. 2022, "Multi-Task Learning as a Bargaining Game").

    Weights: the positive solution of ``G α = 1/α`` (the Nash bargaining solution, ``α_i (Gα)_i = 1``),
    here solved to convergence by damped Newton (:func:`~mtvision.balancing.solvers.nash_bargaining`,
    ``iters`` steps) instead of the authors' 20 CCP iterations through cvxpy/ECOS. At the solution
    ``|Σ α_i g_i|² = T``. As in the authors' code (``NashMTL`` in AvivNavon/nash-mtl), the aggregate
    is then clipped to norm ``max_norm`` (default 1.0; their ``clip_grad_norm_`` on the shared
    parameters), applied here as a scale on the weights; ``max_norm=0`` disables it. Their options to
    recompute the weights only every k steps and to warm-start from the previous step are a
    trainer's concern and not reproduced (Newton converges from a cold start).

    A zero task gradient gets weight 0. Where no solution exists (a positive combination of the
    gradients vanishes, e.g. two opposite gradients), the fixed iterations return a finite point.
    """

    def __init__(self, max_norm: float = 1.0, iters: int = 20):
        if max_norm < 0:
            raise ValueError(f"NashMTL: max_norm must be >= 0, got {max_norm}")
        self.max_norm = float(max_norm)
        self.iters = iters

    @torch.no_grad()
    def weights(self, gram: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_gram(gram)
        G = _gram64(gram)
        w = solvers.nash_bargaining(G, iters=self.iters)
        if self.max_norm > 0:
            norm = (w @ G @ w).clamp_min(0).sqrt()
            w = w * torch.where(norm > self.max_norm, self.max_norm / norm.clamp_min(1e-300), 1.0)
        return _out(w, gram)


@BALANCERS.register("imtl")
class IMTLG(GradientAggregator):
    """IMTL-G (Liu et al. 2021, "Towards Impartial Multi-task Learning"), gradient part.

    The aggregate ``d = Σ α_t g_t`` with ``Σ α_t = 1`` has equal projections on every unit task
    gradient: ``d·u_t`` the same for all t. The paper's closed form
    ``α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹`` is the solution of ``G α = c n`` (``n_t = |g_t|``) normalised to sum
    1, i.e. ``α ∝ G⁻¹ n``, which is what is computed here, symmetric in the tasks and from the Gramian
    alone. The solve carries a 1e-12 relative ridge (the authors' code falls back to a 1e-8 ridge
    when the matrix is singular): duplicated gradients share their weight, a zero gradient gets weight
    0. If ``Σ (G⁻¹n)`` vanishes the weights are 0. Weights may be negative, as in the paper.
    """

    def __init__(self, ridge: float = 1e-12):
        self.ridge = float(ridge)

    @torch.no_grad()
    def weights(self, gram: Tensor, generator: torch.Generator | None = None) -> Tensor:
        T = _check_gram(gram)
        G = _gram64(gram)
        s = G.diagonal().amax()
        G = G / torch.where(s > 0, s, torch.ones_like(s))
        n = G.diagonal().clamp_min(0).sqrt()
        eye = torch.eye(T, dtype=G.dtype, device=G.device)
        v = torch.linalg.solve_ex(G + self.ridge * eye, n)[0]
        tot = v.sum()
        ok = tot.abs() > 1e-12 * v.abs().sum()
        w = torch.where(ok, v / torch.where(ok, tot, 1.0), 0.0)
        return _out(torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0), gram)


@BALANCERS.register("alignedmtl")
class AlignedMTL(GradientAggregator):
    """Aligned-MTL (Senushkin et al. 2023, "Independent Component Alignment for Multi-Task Learning").

    With ``G = V Λ Vᵀ``, the aligned gradients ``Ĝ = J W`` with ``W = σ V Λ^{-1/2} Vᵀ`` are orthogonal
    with equal norms σ (``Wᵀ G W = σ² I`` on the range of G), and the update is their sum, so the task
    weights are ``W 1``. As in the authors' ``ProcrustesSolver`` (SamsungLabs/MTL): eigenvalues below
    ``λ_max · T · eps(float32)`` are dropped (rank truncation), and ``scale_mode`` picks σ as the
    smallest kept singular value (``"min"``, default), the median one (``"median"``, lower median as
    ``torch.median``) or the root mean square (``"rmse"``). All gradients zero: weights 1.

    The eigendecomposition (``torch.linalg.eigh``) checks for errors, which reads a flag back on CUDA:
    the one host synchronisation among these methods.
    """

    def __init__(self, scale_mode: str = "min"):
        if scale_mode not in ("min", "median", "rmse"):
            raise ValueError(f"AlignedMTL: scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}")
        self.scale_mode = scale_mode

    def transform(self, gram: Tensor) -> Tensor:
        """The balance matrix W [T,T] (float64): aligned gradient k is ``Σ_t W[t,k] g_t``."""
        G = _gram64(gram)
        T = G.shape[0]
        s = G.diagonal().amax()
        G = G / torch.where(s > 0, s, torch.ones_like(s))
        lam, V = torch.linalg.eigh(G)
        tol = lam.amax() * T * torch.finfo(torch.float32).eps
        keep = lam > tol
        inv_sqrt = torch.where(keep, lam.clamp_min(1e-300).rsqrt(), 0.0)
        if self.scale_mode == "min":
            sigma2 = torch.where(keep, lam, float("inf")).amin()
        elif self.scale_mode == "median":
            r = keep.sum()
            srt = torch.where(keep, lam, float("inf")).sort()[0]
            sigma2 = srt.gather(0, ((r - 1).clamp_min(0) // 2).reshape(1))[0]
        else:
            sigma2 = (lam * keep).sum() / keep.sum().clamp_min(1)
        any_kept = keep.any()
        sigma = torch.where(any_kept, sigma2, 1.0).clamp_min(0).sqrt()
        W = sigma * (V * inv_sqrt) @ V.T
        return torch.where(any_kept, W, torch.eye(T, dtype=G.dtype, device=G.device))

    @torch.no_grad()
    def weights(self, gram: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_gram(gram)
        return _out(self.transform(gram).sum(1), gram)


class _DualConeProjection(GradientAggregator):
    """Shared by UPGrad and DualProj (torchjd's conventions): a preference vector ``p`` (default 1/T), the
    Gramian divided by its trace (taken as 0 below ``norm_eps``), ``reg_eps·I`` added, and projections
    ``argmin_{v >= u} vᵀGv`` of the rows ``u`` of :meth:`targets`."""

    def __init__(self, pref_vector: Sequence[float] | Tensor | None = None, norm_eps: float = 1e-4,
                 reg_eps: float = 1e-4, max_iter: int | None = None):
        name = type(self).__name__
        if norm_eps < 0 or reg_eps < 0:
            raise ValueError(f"{name}: norm_eps and reg_eps must be >= 0, got {norm_eps}, {reg_eps}")
        self.pref_vector = None if pref_vector is None else [
            float(x) for x in torch.as_tensor(pref_vector, dtype=torch.float64).reshape(-1)]
        self.norm_eps = float(norm_eps)
        self.reg_eps = float(reg_eps)
        self.max_iter = max_iter

    def targets(self, p: Tensor) -> Tensor:
        """The rows to project, ``[R, T]``, from the preference ``p`` [T]."""
        raise NotImplementedError

    @torch.no_grad()
    def weights(self, gram: Tensor, generator: torch.Generator | None = None) -> Tensor:
        T = _check_gram(gram)
        G = _gram64(gram)
        if self.pref_vector is None:
            p = torch.full((T,), 1.0 / T, dtype=G.dtype, device=G.device)
        else:
            if len(self.pref_vector) != T:
                raise ValueError(f"{type(self).__name__}: pref_vector has {len(self.pref_vector)} entries "
                                 f"for {T} tasks")
            p = torch.tensor(self.pref_vector, dtype=G.dtype).to(G.device, non_blocking=True)
        tr = G.diagonal().sum()
        G = torch.where(tr >= self.norm_eps, G / torch.where(tr > 0, tr, 1.0), 0.0)
        G = G + self.reg_eps * torch.eye(T, dtype=G.dtype, device=G.device)
        # Solved for y = D v with D = diag(sqrt(G_ii)) (the same problem on the unit-diagonal D⁻¹GD⁻¹):
        # the active-set tolerances are relative to the largest diagonal entry, and gradient norms can
        # differ by orders of magnitude.
        d = G.diagonal().clamp_min(0).sqrt()
        d = torch.where(d > 0, d, 1.0)
        y = solvers.dual_cone_weights(G / (d[:, None] * d[None, :]), self.targets(p) * d,
                                      max_iter=self.max_iter)
        return _out(y.sum(0) / d, gram)


@BALANCERS.register("upgrad")
class UPGrad(_DualConeProjection):
    """UPGrad (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization").

    Each ``p_i g_i`` is projected onto the dual cone ``{x : g_t·x >= 0 ∀t}`` of the task gradients and
    the projections are summed; with the default preference ``p = 1/T`` this is the mean of the
    projected gradients. The projection of ``Jᵀu`` is ``Jᵀv`` with ``v = argmin_{v >= u} vᵀGv``
    (their Proposition 1), one small QP per task, solved exactly here by
    :func:`~mtvision.balancing.solvers.dual_cone_weights` (all T at once) instead of quadprog.

    As in the authors' torchjd (``UPGradWeighting``): the Gramian is divided by its trace (if the trace
    is below ``norm_eps`` it is taken as 0, and the weights are then ``p``) and ``reg_eps·I`` is added
    before solving (defaults 1e-4 both). quadprog needs that regularisation to have a positive definite
    matrix; this solver does not, and ``reg_eps=0`` gives the exact projection, whose aggregate has a
    non-negative inner product with every task gradient. With the default it is ``>= −reg_eps·tr(G)·w``.
    """

    def targets(self, p: Tensor) -> Tensor:
        return torch.diag(p)  # every p_i g_i projected on its own


@BALANCERS.register("config")
class ConFIG(GradientAggregator):
    """ConFIG (Liu et al. 2025, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks"), with the defaults of the authors' ``conflictfree.grad_operator.ConFIG_update``
    (``weight_model=EqualWeight()``, ``length_model=ProjectionLength()``, ``use_least_square=True``).

    Direction: the minimum-norm least-squares solution x of ``u_i·x = 1`` for every unit task gradient
    ``u_i = g_i/|g_i|`` (``lstsq(units, 1)``: equal, positive projections on every task), normalised to
    ``x̂``; length: ``Σ_i g_i·x̂`` (the projections of the raw gradients); the update is ``length · x̂``.
    From the Gramian: with ``D = diag|g_i|`` and ``Ĝ = D⁻¹GD⁻¹`` the Gramian of the unit gradients,
    ``x = Σ_i c_i u_i`` with ``c = pinv(Ĝ) 1``, so the coefficients on the raw gradients are
    ``a = D⁻¹c``, ``|x|² = cᵀĜc`` and the weights are ``a (1ᵀGa)/|x|²``. No keyword arguments.

    Pseudo-inverse: eigenvalues of Ĝ up to ``T·eps(float32)·λ_max`` count as zero (the rounding that
    a Gramian of float32 gradients carries; as Aligned-MTL here). ``lstsq`` on the ``[T,P]`` unit
    vectors cuts singular values below ``eps·max(T,P)`` of the largest instead; the two differ only
    for unit gradients within ~``sqrt(T·eps32)`` (6e-4 at T = 3) of linear dependence, where the exact
    solution is dominated by that rounding. If ``1`` has no component in the range of Ĝ (beyond the
    same relative tolerance: ``x = 0``, e.g. two opposite gradients) the update is 0, as the authors'
    ``unit_vector`` of a zero vector. A zero gradient (``|g_i|² <= 1e-30 max_j |g_j|²``) gets weight
    0: the authors' code zeroes its undefined unit vector, whose equation then does not change x.
    Duplicated gradients split the direction coefficient of one (x is that of a single copy; the
    length counts both). Weights may be negative (where Ĝ is singular).

    ``torch.linalg.eigh`` checks for errors, which reads a flag back on CUDA (as Aligned-MTL).
    """

    @torch.no_grad()
    def weights(self, gram: Tensor, generator: torch.Generator | None = None) -> Tensor:
        T = _check_gram(gram)
        G = _gram64(gram)
        d = G.diagonal()
        active = d > 1e-30 * d.amax()
        inv_n = torch.where(active, d.clamp_min(1e-300).rsqrt(), 0.0)
        lam, V = torch.linalg.eigh(G * inv_n[:, None] * inv_n[None, :])  # Ĝ; zero rows for zero g_i
        tol = T * torch.finfo(torch.float32).eps
        keep = lam > tol * lam.amax()
        b = torch.where(keep, V.sum(0), 0.0)  # Vᵀ1 on the kept eigenvectors
        b_lam = b / torch.where(keep, lam, 1.0)
        a = inv_n * (V @ b_lam)  # c = V Λ⁺ Vᵀ 1, a = D⁻¹ c
        x2 = (b * b_lam).sum()  # |x|² = 1ᵀ Ĝ⁺ 1
        length = G.sum(0) @ a  # Σ_i g_i · x (= 1ᵀ G a)
        ok = (b * b).sum() > T * tol  # |P 1|² relative to |1|² = T
        w = torch.where(ok, a * (length / torch.where(ok, x2, 1.0)), 0.0)
        return _out(w, gram)


@BALANCERS.register("dualproj")
class DualProj(_DualConeProjection):
    """DualProj (torchjd's ``DualProj``, Quinton & Rey 2024; the projection of Lopez-Paz & Ranzato
    2017, GEM, Eq. 11): the preference-weighted combination of the task gradients (default the mean,
    ``p = 1/T``) projected onto the dual cone ``{x : g_t·x >= 0 ∀t}``, i.e. ``Jᵀv`` with
    ``v = argmin_{v >= p} vᵀGv`` (one QP, :func:`~mtvision.balancing.solvers.dual_cone_weights` with
    ``p`` as its one row). UPGrad projects every ``p_i g_i`` separately and sums; DualProj projects
    their sum once.

    As torchjd (``DualProjWeighting``, kwargs ``pref_vector=None, norm_eps=1e-4, reg_eps=1e-4``) and
    UPGrad here: the Gramian is divided by its trace (if the trace is below ``norm_eps`` it is taken as
    0, and the weights are then ``p``) and ``reg_eps·I`` is added before solving. ``reg_eps=0`` gives
    the exact projection (the aggregate has a non-negative inner product with every task gradient);
    with the default that product is ``>= −reg_eps·tr(G)·v_t``. ``max_iter``: the active-set budget.
    The QP is solved on the unit-diagonal ``D⁻¹GD⁻¹`` (``D = diag sqrt(G_ii)``, variables ``Dv``), the
    same problem, so that gradients whose norms differ by orders of magnitude keep exact constraints.
    """

    def targets(self, p: Tensor) -> Tensor:
        return p[None, :]  # their sum projected once


@BALANCERS.register("fairgrad")
class FairGrad(GradientAggregator):
    """FairGrad (Ban & Ji 2024, "Fair Resource Allocation in Multi-Task Learning").

    α-fair allocation: the weights are the positive solution of ``G w = w^(−1/α)`` element-wise (the
    update ``d = Σ w_i g_i`` gives task i the "utility" ``g_i·d = w_i^(−1/α)``); ``α = 1`` is the
    Nash-MTL system ``G w = 1/w`` (proportional fairness), larger α moves towards max-min fairness.
    The authors' code (``FairGrad`` in OptMN-Lab/fairgrad; LibMTL's ``FairGrad``) minimises
    ``||Gw − w^(−1/α)||²`` with scipy's ``least_squares(bounds=(0, inf))`` from ``w = 1/T``; here the
    same system is solved to convergence on the host by Newton's method
    (:func:`~mtvision.balancing.solvers.fair_allocation`, at most ``iters`` steps), with the same
    solution where one exists. Kwarg ``alpha`` (default 1.0, as LibMTL's ``FairGrad_alpha`` and the
    authors' ``--alpha``). The update is ``Σ w_i g_i`` as in LibMTL; the authors' trainer also
    multiplies it by T and clips it to norm ``max_norm=1`` (not reproduced here: that is the training
    loop's gradient clipping). ``iters`` (default 30): the Newton budget; on CPU the solver stops once
    converged (4 to 15 steps in our tests).

    Scaling G by s scales the weights by ``s^(−α/(α+1))``. A zero task gradient gets weight 0 (it has
    no equation to satisfy). Where no positive solution exists (a non-negative combination of the
    gradients vanishes, e.g. opposed gradients) the residual has no least-squares minimiser either
    (it tends to 0 only as the weights grow without bound): the weights of the cancelling group grow
    until the weighted gradients cancel to 1e-4 of their norms and are then held, the other tasks'
    equations are solved with them, and that finite point is returned (see the solver).
    """

    def __init__(self, alpha: float = 1.0, iters: int = 30):
        if not alpha > 0:
            raise ValueError(f"FairGrad: alpha must be > 0, got {alpha}")
        if iters < 1:
            raise ValueError(f"FairGrad: iters must be >= 1, got {iters}")
        self.alpha = float(alpha)
        self.iters = int(iters)

    @torch.no_grad()
    def weights(self, gram: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_gram(gram)
        return _out(solvers.fair_allocation(_gram64(gram), self.alpha, iters=self.iters), gram)


#: GradVac: a vaccinated gradient with |g^PC|² <= this × (Σ_k |c_k||g_k|)² counts as zero (see the class).
_GRADVAC_RESOLUTION = 1e-10


@BALANCERS.register("gradvac")
class GradVac(GradientAggregator):
    """Gradient Vaccine (Wang et al. 2021, "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models"), whole-model granularity (LibMTL's
    ``GradVac_group_type=0``); kwarg ``beta``, the EMA decay of the similarity targets (default 0.5, as
    LibMTL's ``GradVac_beta``).

    Per step, for each task i over the other tasks j in a random order, with ``g_i^PC`` the current
    (vaccinated) gradient of task i and ``φ = g_i^PC·g_j / (|g_i^PC||g_j| + 1e-8)``: if ``φ < φ̂_ij``,
    ``g_i^PC += |g_i^PC| (φ̂_ij sqrt(1−φ²) − φ sqrt(1−φ̂_ij²)) / (|g_j| sqrt(1−φ̂_ij²) + 1e-8) g_j``
    (the paper's Eq. 3, which sets the cosine to the target); then ``φ̂_ij ← (1−β) φ̂_ij + β φ`` on
    every visit of the pair, whether or not it was changed. The update is ``Σ_i g_i^PC``. As in
    LibMTL's implementation: the targets start at 0 (so the first step projects only conflicting
    pairs, as PCGrad), ``φ`` is taken against the *original* ``g_j``, and the 1e-8 in both
    denominators. A zero ``g_j`` is skipped (its coefficient would multiply a zero vector; its target
    is still updated with ``φ = 0``); ``1 − φ²`` is clamped at 0 against rounding. A vaccinated
    gradient that has cancelled to ``|g_i^PC| <= 1e-5 Σ_k |c_k||g_k|`` (``c`` its coefficients: exactly
    opposed gradients, which the formula's 1e-8 leave at ~1e-8/|g_j| of g_i) has a norm below what the
    Gramian resolves (``|g_i^PC|²`` comes from cancelling terms): it counts as zero for φ, i.e.
    ``φ = 0`` and no change, as the authors' code does for a zero vector.

    Every change is a multiple of an original gradient, so ``g_i^PC`` is tracked as a coefficient
    vector over them (as :class:`PCGrad`) and the weights come from the Gramian. The order of task i's
    partners is drawn as :meth:`PCGrad.task_orders` does, from ``generator``. State: the ``[T,T]``
    float64 targets ``φ̂`` (sized on the first call; a Gramian of another size is an error), in
    :meth:`state_dict` as ``{"targets": tensor}`` (empty before the first step).
    """

    stochastic = True

    def __init__(self, beta: float = 0.5):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"GradVac: beta must be in [0, 1], got {beta}")
        self.beta = float(beta)
        self._targets: Tensor | None = None

    def state_dict(self) -> dict:
        return {} if self._targets is None else {"targets": self._targets.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        targets = state.get("targets")
        if targets is None:
            self._targets = None
            return
        targets = torch.as_tensor(targets).detach().to(torch.float64).clone()
        if targets.dim() != 2 or targets.shape[0] != targets.shape[1]:
            raise ValueError(f"GradVac.load_state_dict: targets must be [T,T], got {tuple(targets.shape)}")
        self._targets = targets

    @torch.no_grad()
    def weights(self, gram: Tensor, generator: torch.Generator | None = None) -> Tensor:
        T = _check_gram(gram)
        G = _gram64(gram)
        rho = self._targets
        if rho is None:
            rho = torch.zeros(T, T, dtype=G.dtype, device=G.device)
        elif rho.shape != (T, T):
            raise ValueError(f"GradVac: the targets are for {rho.shape[0]} tasks, the Gramian has {T}")
        else:
            rho = rho.to(G.device)
        orders = PCGrad.task_orders(T, generator, G.device)
        norms = G.diagonal().clamp_min(0).sqrt()
        C = torch.eye(T, dtype=G.dtype, device=G.device)  # row i: coefficients of g_i^PC
        beta = self.beta
        for s in range(T - 1):
            j = orders[:, s, None]  # [T,1]: task i's partner at this position
            CG = C @ G  # row i: g_i^PC · g_k for every k
            n2 = (CG * C).sum(1, keepdim=True)
            bound = C.abs() @ norms[:, None]  # Σ_k |c_ik| |g_k| >= |g_i^PC|
            resolved = n2 > _GRADVAC_RESOLUTION * bound * bound
            n_i = torch.where(resolved, n2, 0.0).sqrt()
            dots = torch.where(resolved, CG.gather(1, j), 0.0)
            n_j = norms[j]
            phi = dots / (n_i * n_j + 1e-8)
            tgt = rho.gather(1, j)
            s_phi = (1 - phi * phi).clamp_min(0).sqrt()
            s_tgt = (1 - tgt * tgt).clamp_min(0).sqrt()
            coef = n_i * (tgt * s_phi - phi * s_tgt) / (n_j * s_tgt + 1e-8)
            C = C.scatter_add(1, j, torch.where((phi < tgt) & (n_j > 0), coef, 0.0))
            rho = rho.scatter(1, j, (1 - beta) * tgt + beta * phi)
        self._targets = rho
        return _out(C.sum(0), gram)
