"""Small solvers on a T×T Gramian, in PyTorch, for the gradient-aggregation methods.

Every solver runs a fixed number of iterations on device tensors (no ``.item()``, no branch on a
tensor value), so the whole weight computation can be queued behind the backward passes without a
host synchronisation; only on CPU, where reading a value costs no synchronisation, do the loops stop
early once converged (same result), and the active-set method takes its steps with Python control
flow (the trainer solves on the host, where every operator call is time the device waits for). They
work in float64 whatever the input dtype (T ≤ ~50, so this costs nothing) and accept a positive *semi*-definite matrix: duplicated, collinear and zero task gradients are
handled without a regularisation that would move the solution.

- :func:`nnls_gram` — ``min_{x >= 0} ½ xᵀQx − qᵀx`` (Lawson–Hanson active set, batched right-hand
  sides). The two QPs of the methods reduce to it: the min-norm point of a convex hull (MGDA) and the
  projection onto the dual cone of the task gradients (UPGrad).
- :func:`min_norm_simplex` / :func:`min_norm_simplex_fw` — ``argmin_{α ∈ Δ} αᵀGα``, exactly (active set)
  or with the Frank–Wolfe iterations of Sener & Koltun's Algorithm 2.
- :func:`dual_cone_weights` — ``argmin_{v >= u} vᵀGv`` for each row ``u`` of ``U`` (Quinton & Rey 2024,
  Proposition 1).
- :func:`project_simplex` — Euclidean projection of the rows of a matrix onto the probability simplex.
- :func:`simplex_newton` — projected Newton on the simplex for a smooth convex function, with a
  line search evaluated for all step sizes at once (CAGrad's dual).
- :func:`nash_bargaining` — the positive solution of ``G w = 1/w`` (Nash-MTL) by damped Newton.
- :func:`fair_allocation` — the positive solution of ``G w = w^(−1/α)`` (FairGrad) by Newton with a line
  search; on CPU in NumPy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "dual_cone_weights",
    "fair_allocation",
    "min_norm_simplex",
    "min_norm_simplex_fw",
    "nash_bargaining",
    "nnls_gram",
    "project_simplex",
    "simplex_newton",
]

_TINY = 1e-300


def _host_visible(t: Tensor) -> bool:
    """True where reading a tensor value needs no device synchronisation (CPU tensors): there the
    fixed-iteration loops may stop as soon as they have converged."""
    return t.device.type == "cpu"


def _sym64(gram: Tensor) -> Tensor:
    g = gram.detach().to(torch.float64)
    return 0.5 * (g + g.transpose(-1, -2))


def nnls_gram(Q: Tensor, q: Tensor, max_iter: int | None = None, tol: float = 1e-10) -> Tensor:
    """Solve ``min_{x >= 0} ½ xᵀ Q x − qᵀ x`` for each row of ``q``.

    ``Q`` [T,T] symmetric positive semi-definite, ``q`` [B,T] (or [T]); returns x with q's shape, float64.
    This is Lawson & Hanson's NNLS active-set method written on the normal equations
    (``Q = AᵀA``, ``q = Aᵀb``): the passive set only ever holds linearly independent columns of A,
    so the sub-systems stay non-singular even when Q is singular. Each iteration is either an outer
    step (free the variable with the largest negative gradient, solve on the passive set) or an inner
    step (move to the boundary, drop the variables that hit zero, solve again); rows that have
    converged stop changing. ``max_iter`` defaults to ``2T + 6``: in practice the method ends after
    about as many outer steps as the solution has positive entries (at most T + 1 iterations in our
    tests of T <= 10); an exhausted budget still returns a feasible point, better than 0. On CPU the
    same steps run row by row with Python control flow (:func:`_nnls_rows_host`), a handful of
    operator calls per step instead of ~70, and stop as soon as a row has converged.
    """
    Q = _sym64(Q)
    squeeze = q.dim() == 1
    q = q.detach().to(torch.float64).reshape(-1, Q.shape[0])
    B, T = q.shape
    if max_iter is None:
        max_iter = 2 * T + 6
    dev = Q.device
    scale = Q.diagonal().abs().amax().clamp_min(_TINY)
    # The passive set is independent in exact arithmetic; the ridge only keeps rounding from
    # producing inf when two columns are equal to the last bit.
    ridge = 1e-13 * scale
    thr = (tol * (scale + q.abs().amax(-1))).clamp_min(_TINY)  # [B]
    if _host_visible(q):
        x = _nnls_rows_host(Q, q, thr.tolist(), float(ridge), max_iter)
        return x.reshape(T) if squeeze else x
    idx = torch.arange(T, device=dev)

    x = q.new_zeros(B, T)
    P = torch.zeros(B, T, dtype=torch.bool, device=dev)
    inner = torch.zeros(B, dtype=torch.bool, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    for _ in range(max_iter):
        w = q - x @ Q  # minus the gradient
        wmax, j = w.masked_fill(P, float("-inf")).max(-1)
        add = ~inner & ~done & (wmax > thr)
        new = add[:, None] & (idx[None, :] == j[:, None])
        P1 = P | new
        both = P1[:, :, None] & P1[:, None, :]
        M = torch.where(both, Q, 0.0) + torch.diag_embed(torch.where(P1, ridge, 1.0))
        z = torch.linalg.solve_ex(M, torch.where(P1, q, 0.0))[0]
        z = torch.where(P1, z, 0.0)
        neg = P1 & (z <= 0)
        feasible = ~neg.any(-1)
        # A freed variable that comes back non-positive means w_j > 0 was rounding noise: stop there
        # instead of cycling (Lawson & Hanson's safeguard).
        bad = add & (torch.where(new, z, 1.0) <= 0).any(-1)
        done = done | bad
        act = (inner | add) & ~bad
        ratio = torch.where(neg, x / (x - z).clamp_min(_TINY), float("inf"))
        step, k = ratio.min(-1)
        step = step.clamp(max=1.0)
        xs = x + step[:, None] * (z - x)
        keep = P1 & (xs > 1e-15 * xs.abs().amax(-1, keepdim=True)) & (idx[None, :] != k[:, None])
        P_new = torch.where(feasible[:, None], P1, keep)
        x_new = torch.where(P_new, torch.where(feasible[:, None], z, xs), 0.0)
        x = torch.where(act[:, None], x_new, x)
        P = torch.where(act[:, None], P_new, P)
        inner = torch.where(act, ~feasible, inner)
    return x.reshape(T) if squeeze else x


def _nnls_rows_host(Q: Tensor, q: Tensor, thr: list[float], ridge: float, max_iter: int) -> Tensor:
    """:func:`nnls_gram`'s iterations for CPU tensors, one row of ``q`` at a time: the same outer and
    inner steps, tolerances and budget as the batched loop (the tests check both give the same
    result), with the index sets and the step arithmetic in Python and only the passive-set solve
    in PyTorch."""
    B, T = q.shape
    Ql, ql = Q.tolist(), q.tolist()
    eye = torch.eye(T, dtype=Q.dtype)

    def solve(passive: list[int], b: int) -> list[float]:
        idx = torch.tensor(passive)
        A = Q.index_select(0, idx).index_select(1, idx) + ridge * eye[: len(passive), : len(passive)]
        z = torch.linalg.solve_ex(A, q[b].index_select(0, idx))[0].tolist()
        out = [0.0] * T
        for i, v in zip(passive, z):
            out[i] = v
        return out

    rows = []
    for b in range(B):
        x, P, inner = [0.0] * T, [False] * T, False
        for _ in range(max_iter):
            j = -1
            if not inner:  # outer step: free the variable with the largest negative gradient
                free = [(ql[b][i] - sum(Ql[i][k] * x[k] for k in range(T) if P[k]), i)
                        for i in range(T) if not P[i]]
                if not free:
                    break
                wmax = max(w for w, _ in free)
                if not wmax > thr[b]:
                    break  # converged
                j = next(i for w, i in free if w == wmax)
            P1 = list(P)
            if j >= 0:
                P1[j] = True
            z = solve([i for i in range(T) if P1[i]], b)
            if j >= 0 and z[j] <= 0:
                break  # the freed variable comes back non-positive: rounding noise (Lawson & Hanson)
            neg = [i for i in range(T) if P1[i] and z[i] <= 0]
            if not neg:
                x = [z[i] if P1[i] else 0.0 for i in range(T)]
                P, inner = P1, False
                continue
            # inner step: move towards z up to the boundary, drop the variables that reach it
            step, k = min((x[i] / max(x[i] - z[i], _TINY), i) for i in neg)
            step = min(step, 1.0)
            xs = [x[i] + step * (z[i] - x[i]) for i in range(T)]
            big = 1e-15 * max(abs(v) for v in xs)
            P = [P1[i] and xs[i] > big and i != k for i in range(T)]
            x = [xs[i] if P[i] else 0.0 for i in range(T)]
            inner = True
        rows.append(x)
    return torch.tensor(rows, dtype=Q.dtype)


def _normalised(G: Tensor) -> Tensor:
    """G divided by its largest diagonal entry (left as is when that is 0): the simplex problems are
    scale-invariant, and the tolerances of the solvers are then relative."""
    s = G.diagonal().amax()
    return G / torch.where(s > 0, s, torch.ones_like(s))


def min_norm_simplex(gram: Tensor, max_iter: int | None = None) -> Tensor:
    """``argmin_{α ∈ Δ} αᵀ G α`` [T] float64: the weights of the min-norm point of the convex hull of
    the task gradients. Exact (active set): with ``A = [J; 1ᵀ]`` and ``b = (0, 1)``,
    ``λ = argmin_{λ >= 0} ||Aλ − b||²`` satisfies ``λ / Σλ = α`` (the least-distance-programming
    reduction of Lawson & Hanson, ch. 23), which :func:`nnls_gram` solves with ``Q = G + 11ᵀ``.
    For several minimisers (duplicated gradients) one of them is returned; the point ``Jᵀα`` is unique.
    """
    G = _normalised(_sym64(gram))
    T = G.shape[0]
    lam = nnls_gram(G + 1.0, torch.ones(T, dtype=G.dtype, device=G.device), max_iter=max_iter)
    return lam / lam.sum().clamp_min(_TINY)


def min_norm_simplex_fw(gram: Tensor, iters: int = 250) -> Tensor:
    """Frank–Wolfe for ``argmin_{α ∈ Δ} αᵀ G α`` (Sener & Koltun 2018, Algorithm 2, with the exact
    line search of their Algorithm 1), started as in the authors' ``find_min_norm_element_FW`` from the
    best pair of tasks; ``iters`` fixed iterations (the authors' MAX_ITER is 250). Converges as
    O(1/iters); :func:`min_norm_simplex` is exact and usually cheaper."""
    G = _normalised(_sym64(gram))
    T = G.shape[0]
    eye = torch.eye(T, dtype=G.dtype, device=G.device)
    if T == 1:
        return eye[0]
    d = G.diagonal()
    gii, gjj = d[:, None], d[None, :]
    den = gii + gjj - 2 * G
    gamma = torch.where(den > 0, (gjj - G) / den.clamp_min(_TINY), 1.0).clamp(0.0, 1.0)  # weight of i
    cost = gamma**2 * gii + 2 * gamma * (1 - gamma) * G + (1 - gamma) ** 2 * gjj
    cost = cost.masked_fill(eye.bool(), float("inf"))
    # Tensor indices throughout (index_select, not tensor[0-dim]): Python indexing would read them back.
    flat = cost.reshape(-1).argmin().reshape(1)
    g_ij = gamma.reshape(-1).index_select(0, flat)
    alpha = g_ij * eye.index_select(0, flat // T)[0] + (1 - g_ij) * eye.index_select(0, flat % T)[0]
    for _ in range(iters):
        Ga = G @ alpha
        t = Ga.argmin().reshape(1)
        v1v1 = alpha @ Ga
        v1v2 = Ga.index_select(0, t)
        v2v2 = d.index_select(0, t)
        den = v1v1 + v2v2 - 2 * v1v2
        g = torch.where(den > 0, (v1v1 - v1v2) / den.clamp_min(_TINY), 0.0).clamp(0.0, 1.0)
        alpha = (1 - g) * alpha + g * eye.index_select(0, t)[0]
    return alpha


def dual_cone_weights(gram: Tensor, U: Tensor, max_iter: int | None = None) -> Tensor:
    """For each row ``u`` of ``U`` [B,T], the ``v`` [T] with ``Jᵀv`` the projection of ``Jᵀu`` onto the
    dual cone ``{x : Jx >= 0}`` of the task gradients: ``v = argmin_{v >= u} vᵀGv`` (Quinton & Rey
    2024, Prop. 1), solved as ``v = u + x``, ``x = argmin_{x >= 0} ½xᵀGx + (Gu)ᵀx``. Returns [B,T]
    float64."""
    G = _sym64(gram)
    U = U.detach().to(torch.float64)
    x = nnls_gram(G, -(U @ G), max_iter=max_iter)
    return U + x


def project_simplex(Y: Tensor) -> Tensor:
    """Euclidean projection of each row of ``Y`` [K,T] onto the probability simplex (sort-based,
    Held et al. 1974 / Duchi et al. 2008)."""
    T = Y.shape[-1]
    Us = Y.sort(-1, descending=True)[0]
    css = Us.cumsum(-1) - 1
    k = torch.arange(1, T + 1, device=Y.device, dtype=Y.dtype)
    rho = (Us - css / k > 0).sum(-1, keepdim=True).clamp_min(1)  # >= 1 unless Y has inf/nan
    theta = css.gather(-1, rho - 1) / rho.to(Y.dtype)
    return (Y - theta).clamp_min(0)


def simplex_newton(fun: Callable[[Tensor], Tensor], grad_hess: Callable[[Tensor], tuple[Tensor, Tensor]],
                   w0: Tensor, iters: int = 20, num_steps: int = 10, kkt_tol: float = 1e-8) -> Tensor:
    """Minimise a smooth convex ``fun`` over the probability simplex, from ``w0`` [T].

    ``fun(W [K,T]) -> [K]``; ``grad_hess(w [T]) -> (g [T], H [T,T])``. Each iteration builds the Newton
    direction p on the free face (coordinates that are positive or whose gradient is below the
    multiplier estimate ``wᵀg``) with ``Σp = 0``; it evaluates ``fun`` at ``w + t p`` for ``num_steps``
    halvings of ``t`` from ``min(1, t_max)`` (``t_max`` where the ray leaves the simplex), at
    ``proj(w + t p)`` (which may change the face) and at ``proj(w − η g)`` for as many step sizes
    around ``1/||H||``, all in one batched call, and keeps the best point (or ``w``).
    The iterates are monotone; once the face is found the steps are Newton steps (quadratic
    convergence). On CPU the loop stops once the KKT conditions hold to ``kkt_tol`` relative to the
    largest gradient entry, or once no candidate moves w.
    """
    w = w0.to(torch.float64)
    T = w.shape[0]
    dev, dt = w.device, w.dtype
    ts = 2.0 ** -torch.arange(num_steps, device=dev, dtype=dt)
    etas = 4.0 ** torch.arange(-2, num_steps - 2, device=dev, dtype=dt)
    for _ in range(iters):
        g, H = grad_hess(w)
        lam = w @ g
        if _host_visible(w):
            # KKT conditions on the simplex: g_i = λ where w_i > 0, g_i >= λ where w_i = 0
            support = w > 1e-12
            residual = torch.where(support, (g - lam).abs(), (lam - g).clamp_min(0)).amax()
            if float(residual) <= kkt_tol * float(g.abs().amax().clamp_min(1e-300)):
                break
        free = (w > 1e-12) | (g < lam)
        ff = free[:, None] & free[None, :]
        hs = H.diagonal().abs().amax().clamp_min(1e-30)
        Hf = torch.where(ff, H, 0.0) + torch.diag(torch.where(free, 1e-10 * hs, 1.0))
        fcol = free.to(dt)
        K = torch.cat([torch.cat([Hf, fcol[:, None]], 1),
                       torch.cat([fcol, torch.zeros(1, device=dev, dtype=dt)])[None, :]], 0)
        rhs = torch.cat([-torch.where(free, g, 0.0), torch.zeros(1, device=dev, dtype=dt)])
        p = torch.where(free, torch.linalg.solve_ex(K, rhs)[0][:T], 0.0)
        p = torch.nan_to_num(p, nan=0.0, posinf=0.0, neginf=0.0)
        # Along p (Σp = 0) the simplex ends at t_max; near-flat directions give a huge p, and then
        # the point on the boundary, not the projection of a far-away point, is the candidate.
        t_max = torch.where(p < 0, w / (-p).clamp_min(1e-300), float("inf")).amin()
        ray = (w[None] + (torch.clamp(t_max, max=1.0) * ts)[:, None] * p[None]).clamp_min(0)
        steps = torch.cat([ts[:, None] * p[None], -(etas / hs)[:, None] * g[None]], 0)
        cand = torch.cat([w[None], ray / ray.sum(-1, keepdim=True), project_simplex(w[None] + steps)], 0)
        vals = torch.nan_to_num(fun(cand), nan=float("inf"))
        best = vals.argmin()
        w_prev, w = w, cand.index_select(0, best.reshape(1))[0]
        if _host_visible(w) and float((w - w_prev).abs().amax()) <= 1e-12:
            # no candidate moves w beyond rounding: later iterations would repeat this one (the
            # Newton steps converge quadratically, so this comes a few iterations after the face)
            break
    return w / w.sum()  # projections of far-away points leave ~1e-12 of rounding on the sum


def nash_bargaining(gram: Tensor, iters: int = 20) -> Tensor:
    """The positive solution ``w`` [T] float64 of ``G w = 1/w`` (Navon et al. 2022, Nash-MTL).

    It is the minimiser of the strictly convex, self-concordant ``f(w) = ½wᵀGw − Σ log w_i``;
    damped Newton (step ``1/(1+λ)`` while the Newton decrement λ >= 1/4, full steps after) stays in
    the positive orthant and converges quadratically near the solution. Started from ``1/sqrt(G_ii)``
    rescaled by the exact line minimum along that ray. Tasks with a zero gradient (``G_ii`` = 0
    relative to the largest) have no solution (any weight works): they get weight 0, and the other
    tasks are solved alone. When no solution exists (a positive combination of the gradients is 0,
    e.g. two opposite gradients) f is unbounded below and the fixed iterations return a finite point
    of decreasing f, not a solution.
    """
    G = _sym64(gram)
    T = G.shape[0]
    s = G.diagonal().amax()
    s = torch.where(s > 0, s, torch.ones_like(s))
    Gn = G / s
    active = Gn.diagonal() > 1e-12
    both = active[:, None] & active[None, :]
    # Inactive tasks are decoupled with G_ii = 1 (w_i = 1), then zeroed.
    Gm = torch.where(both, Gn, 0.0) + torch.diag(torch.where(active, 0.0, 1.0))
    w = Gm.diagonal().rsqrt()
    w = w * (T / (w @ Gm @ w).clamp_min(_TINY)).sqrt()
    for _ in range(iters):
        grad = Gm @ w - 1.0 / w
        H = Gm + torch.diag(w ** -2)
        delta = torch.linalg.solve_ex(H, grad)[0]
        dec = (grad @ delta).clamp_min(0).sqrt()
        step = torch.where(dec < 0.25, 1.0, 1.0 / (1.0 + dec))
        w = (w - step * delta).clamp_min(1e-300)
        if _host_visible(dec) and float(dec) < 1e-10:
            break  # quadratic convergence: the next step would change w by ~dec² relatively
    # Back to the original scale: G (w / sqrt(s)) = 1 / (w / sqrt(s)).
    return torch.where(active, w / s.sqrt(), 0.0)


def fair_allocation(gram: Tensor, alpha: float = 1.0, iters: int = 30, num_steps: int = 20) -> Tensor:
    """The positive solution ``w`` [T] float64 of ``G w = w^(−1/α)`` (element-wise; Ban & Ji 2024,
    FairGrad's α-fair allocation; ``α = 1`` is Nash-MTL's ``G w = 1/w``, :func:`nash_bargaining`).

    It is the minimiser of the strictly convex ``f(w) = ½wᵀGw + Σ φ(w_i)`` with ``φ'(w) = −w^(−1/α)``
    (``φ = −log w`` for ``α = 1``, ``−w^(1−1/α)/(1−1/α)`` otherwise). Each step takes the Newton step
    ``Δ = −H⁻¹∇f`` (``H = G + diag(w^(−1/α−1)/α)``) relative to w, ``z = Δ/w`` (solved on the system
    scaled by ``diag(w)``: the weights may differ by orders of magnitude), and moves multiplicatively,
    ``w ← w·exp(t z)``: to first order the Newton step, and w stays positive. ``t`` starts at 1, or
    at what changes no weight by more than a factor ``e^20``, and is halved (up to ``num_steps``
    times) until f decreases enough (Armijo); the decrease is summed term by term (``expm1``), so it
    is resolved even where f is dominated by other tasks' terms. Started from ``G_ii^(−α/(α+1))`` (the
    solution for orthogonal gradients) scaled to the minimum of f along that ray. Solved on G divided
    by its largest diagonal entry s, then scaled back (the solution for ``sG`` is ``s^(−α/(α+1))`` times
    that for G). ``H`` is also the Jacobian of the residual ``Gw − w^(−1/α)`` whose squared norm the
    authors minimise with scipy's ``least_squares``: where a solution exists, both find it.

    A task with a zero gradient (``G_ii <= 1e-30 max_j G_jj``) has no equation to satisfy: it gets
    weight 0 and the others are solved alone. A solution exists unless a non-negative combination of
    the gradients vanishes (e.g. two opposite gradients): then f is unbounded below, and the residual
    tends to 0 only as the weights of that combination grow without bound (no least-squares minimiser
    either; scipy stops where the gradient of its cost falls below a tolerance). Here, once the
    weighted gradients cancel, ``|Σ w_i g_i|² <= 1e-8 Σ w_i²|g_i|²`` (to 1e-4 of their norms, below
    the precision of a float32 Gramian), the weights of the cancelling group (the tasks with
    ``w_i²|g_i|² > 1e4 |Σ w_i g_i|²``) are held and the other tasks' equations are solved with them:
    a finite point. Where the equations cannot be resolved in float64 (norms many orders of magnitude
    apart with a small or large α) the ``iters`` steps also return a finite point.

    On CPU the steps run in NumPy and stop once converged (a full step that changed no weight by more
    than 1e-9 relatively: the next would be ~1e-18), or when no step size decreases f; elsewhere
    ``iters`` steps run as tensor operations with every step size tried at once, and a stopped iterate
    no longer moves (no host synchronisation). Same steps, same solution.
    """
    if not alpha > 0:
        raise ValueError(f"fair_allocation: alpha must be > 0, got {alpha}")
    alpha = float(alpha)
    expo = -alpha / (alpha + 1.0)
    if _host_visible(gram):
        G = gram.detach().to(torch.float64).numpy()
        G = 0.5 * (G + G.T)
        s = float(G.diagonal().max())
        s = s if s > 0 else 1.0
        G = G / s
        active = G.diagonal() > 1e-30
        # Inactive tasks are decoupled with G_ii = 1 (w = w^(−1/α) gives 1), then zeroed.
        G = np.where(active[:, None] & active[None, :], G, 0.0) + np.diag(np.where(active, 0.0, 1.0))
        w = _fair_host(G, alpha, iters, num_steps)
        return torch.from_numpy(np.where(active, w * s**expo, 0.0))
    G = _sym64(gram)
    s = G.diagonal().amax()
    s = torch.where(s > 0, s, torch.ones_like(s))
    G = G / s
    active = G.diagonal() > 1e-30
    G = torch.where(active[:, None] & active[None, :], G, 0.0) + torch.diag(torch.where(active, 0.0, 1.0))
    w = _fair_batched(G, alpha, iters, num_steps)
    return torch.where(active, w * s.pow(expo), 0.0)


# The start is G_ii^(−α/(α+1)) scaled to the minimum of f along that ray, t^(1+1/α) = Σ u_i^(1−1/α)/uᵀGu,
# or not scaled where the ray is a vanishing combination (uᵀGu <= 1e-12 T). A step changes no weight by
# more than a factor e^_FAIR_MAX_LOG_STEP. Where |Σ w_i g_i|² <= _FAIR_CANCEL Σ w_i²|g_i|², the tasks
# with w_i²|g_i|² > _FAIR_GROUP |Σ w_i g_i|² form a cancelling group whose weights are held.
_FAIR_FLAT = 1e-12
_FAIR_MAX_LOG_STEP = 20.0
_FAIR_CANCEL = 1e-8
_FAIR_GROUP = 1e4


def _fair_decrease_terms(w, wq, Gw, s, G, alpha: float, expm1, cat):
    """The terms whose sum is ``f(w·exp(s)) − f(w)`` (last axis), for NumPy or torch: with
    ``dw = w·expm1(s)``, ``dwᵀGw + ½dwᵀG dw`` and ``φ(w e^s) − φ(w)`` (``−s`` for α = 1, else
    ``−w^q expm1(q s)/q``, ``q = 1 − 1/α``, ``wq = w^q``)."""
    dw = w * expm1(s)
    if alpha == 1.0:
        dphi = -s
    else:
        q = 1.0 - 1.0 / alpha
        dphi = -wq * expm1(q * s) / q
    return cat([dw * Gw, 0.5 * dw * (dw @ G), dphi])


def _fair_host(G: np.ndarray, alpha: float, iters: int, num_steps: int) -> np.ndarray:
    """:func:`fair_allocation`'s steps in NumPy on ``G`` [T,T] (normalised, positive diagonal)."""
    e = 1.0 / alpha
    T = G.shape[0]
    diag = np.diag_indices(T)
    d = G.diagonal()
    w = d ** (-alpha / (alpha + 1.0))
    a = float(w @ G @ w)
    if a > _FAIR_FLAT * T:
        w = w * (float((w ** (1.0 - e)).sum()) / a) ** (alpha / (alpha + 1.0))
    for _ in range(iters):
        Gw = G @ w
        p = w**-e
        Hs = G * np.outer(w, w)
        Hs[diag] += e * p * w  # diag(w) H diag(w)
        wr = w * (Gw - p)
        wgw, big = float(w @ Gw), d * w * w
        if wgw <= _FAIR_CANCEL * float(big.sum()):  # a cancelling group: hold its weights
            frozen = big > _FAIR_GROUP * wgw
            Hs[frozen, :] = 0.0
            Hs[:, frozen] = 0.0
            Hs[frozen, frozen] = 1.0
            wr = np.where(frozen, 0.0, wr)
        try:
            z = -np.linalg.solve(Hs, wr)  # the Newton step relative to w
        except np.linalg.LinAlgError:
            break  # an exactly singular system: the batched loop gets inf/nan and does not move
        dec2 = -float(wr @ z)
        if not dec2 > 0:
            break  # converged (or a non-finite step): the batched loop does not move either
        zmax = float(np.abs(z).max())
        t = min(1.0, _FAIR_MAX_LOG_STEP / zmax)
        wq = None if alpha == 1.0 else w ** (1.0 - e)
        for _k in range(num_steps):
            terms = _fair_decrease_terms(w, wq, Gw, t * z, G, alpha, np.expm1, np.concatenate)
            if terms.sum() <= -1e-4 * t * dec2 + 1e-13 * np.abs(terms).sum():
                break
            t *= 0.5
        else:
            break  # no step size decreases f: the batched loop stays here too
        w = w * np.exp(t * z)
        if t == 1.0 and zmax <= 1e-9:
            break
    return w


def _fair_batched(G: Tensor, alpha: float, iters: int, num_steps: int) -> Tensor:
    """:func:`fair_allocation`'s steps as tensor operations: ``iters`` steps, every step size
    evaluated at once, no value read back."""
    e = 1.0 / alpha
    T = G.shape[0]
    halvings = 2.0 ** -torch.arange(num_steps, dtype=G.dtype, device=G.device)
    eye = torch.eye(T, dtype=torch.bool, device=G.device)
    d = G.diagonal()
    w = d ** (-alpha / (alpha + 1.0))
    a = w @ G @ w
    flat = a <= _FAIR_FLAT * T
    t = ((w ** (1.0 - e)).sum() / torch.where(flat, 1.0, a)) ** (alpha / (alpha + 1.0))
    w = w * torch.where(flat, 1.0, t)
    for _ in range(iters):
        Gw = G @ w
        p = w**-e
        Hs = G * torch.outer(w, w) + torch.where(eye, torch.diag(e * p * w), 0.0)
        wr = w * (Gw - p)
        wgw, big = w @ Gw, d * w * w
        frozen = (wgw <= _FAIR_CANCEL * big.sum()) & (big > _FAIR_GROUP * wgw)
        Hs = torch.where(frozen[:, None] | frozen[None, :], eye.to(Hs.dtype), Hs)
        wr = torch.where(frozen, 0.0, wr)
        z = -torch.linalg.solve_ex(Hs, wr)[0]
        dec2 = -(wr @ z)
        zmax = z.abs().amax()
        ts = (_FAIR_MAX_LOG_STEP / zmax.clamp_min(_TINY)).clamp(max=1.0) * halvings
        S = ts[:, None] * z  # [K,T]
        wq = None if alpha == 1.0 else w ** (1.0 - e)
        terms = _fair_decrease_terms(w, wq, Gw, S, G, alpha, torch.expm1, lambda xs: torch.cat(xs, -1))
        ok = terms.sum(-1) <= -1e-4 * ts * dec2 + 1e-13 * terms.abs().sum(-1)
        ok = ok & (dec2 > 0)
        k = ok.to(torch.int8).argmax().reshape(1)  # the first (longest) accepted step
        w = torch.where(ok.any(), w * S.index_select(0, k)[0].exp(), w)
    return w
