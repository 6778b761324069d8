"""Gradient-aggregation methods against their definitions, on random Jacobians.

The reference solvers here are generic and independent of the ones under test: exhaustive
enumeration of active sets (exact for the small QPs, T <= 10), textbook Newton with backtracking,
the methods' formulas applied to the gradient vectors themselves.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch

from mtvision.balancing import AGGREGATORS, solvers
from mtvision.balancing.aggregators import (
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    GradientAggregator,
    NashMTL,
    PCGrad,
    UPGrad,
)

from . import helpers
from .helpers import NoHostRead, gram

#: The methods whose weights come from one batch's Gramian alone, as a weighted sum of the gradients,
#: with no state across steps (the others keep state, combine element-wise, or take several batches:
#: their own test files cover them).
GRAMIAN_METHODS = sorted(n for n, c in AGGREGATORS.items()
                         if c.batches_per_step == 1 and c.linear and c.prepare is GradientAggregator.prepare
                         and c.state_dict is GradientAggregator.state_dict)
#: The methods solved with torch operations only: their weights could be computed on an accelerator
#: without reading a value back (the training step solves every method on the host).
DEVICE_SOLVABLE = ["alignedmtl", "cagrad", "imtl", "mgda", "nashmtl", "pcgrad", "upgrad"]

KINDS = ("random", "conflicting", "aligned", "duplicated", "zero")
SIZES = (2, 3, 5, 10)


make_jacobian = functools.partial(helpers.make_jacobian, kinds=KINDS)  # [T,P] float64 of a structure
cases = functools.partial(helpers.cases, sizes=SIZES, kinds=KINDS)


# ----------------------------------------------------------------------------------------------
# generic reference solvers (numpy, float64)


def ref_min_norm(G: np.ndarray) -> np.ndarray:
    """argmin_{α ∈ Δ} αᵀGα by enumerating supports S and solving the KKT system on each."""
    T = len(G)
    best, best_a = np.inf, None
    for r in range(1, T + 1):
        for S in itertools.combinations(range(T), r):
            S = list(S)
            K = np.zeros((r + 1, r + 1))
            K[:r, :r] = G[np.ix_(S, S)]
            K[:r, r] = K[r, :r] = 1.0
            rhs = np.zeros(r + 1)
            rhs[r] = 1.0
            sol = np.linalg.lstsq(K, rhs, rcond=None)[0][:r]
            if (sol < -1e-12).any() or abs(sol.sum() - 1) > 1e-9:
                continue
            a = np.zeros(T)
            a[S] = np.maximum(sol, 0)
            a /= a.sum()
            val = a @ G @ a
            if val < best - 1e-15:
                best, best_a = val, a
    return best_a


def ref_dual_cone(G: np.ndarray, u: np.ndarray) -> np.ndarray:
    """argmin_{v >= u} vᵀGv by enumerating the set of coordinates above their bound."""
    T = len(G)
    best, best_v = u @ G @ u, u.copy()
    for r in range(1, T + 1):
        for S in itertools.combinations(range(T), r):
            S = list(S)
            N = [i for i in range(T) if i not in S]
            v = u.copy()
            v[S] = np.linalg.lstsq(G[np.ix_(S, S)], -G[np.ix_(S, N)] @ u[N], rcond=None)[0]
            if (v[S] < u[S] - 1e-12).any():
                continue
            v = np.maximum(v, u)
            val = v @ G @ v
            if val < best - 1e-15:
                best, best_v = val, v
    return best_v


def ref_nnls(Q: np.ndarray, q: np.ndarray) -> np.ndarray:
    """argmin_{x >= 0} ½xᵀQx − qᵀx by enumeration."""
    T = len(q)
    best, best_x = 0.0, np.zeros(T)
    for r in range(1, T + 1):
        for S in itertools.combinations(range(T), r):
            S = list(S)
            xs = np.linalg.lstsq(Q[np.ix_(S, S)], q[S], rcond=None)[0]
            if (xs < -1e-12).any():
                continue
            x = np.zeros(T)
            x[S] = np.maximum(xs, 0)
            val = 0.5 * x @ Q @ x - q @ x
            if val < best - 1e-15:
                best, best_x = val, x
    return best_x


def ref_nash(G: np.ndarray, tol: float = 1e-13) -> np.ndarray:
    """Newton with Armijo backtracking on f(w) = ½wᵀGw − Σ log w (textbook, not damped Newton)."""
    f = lambda w: 0.5 * w @ G @ w - np.log(w).sum()  # noqa: E731
    w = 1 / np.sqrt(np.diag(G))
    for _ in range(500):
        g = G @ w - 1 / w
        if np.abs(g * w).max() < tol:
            break
        step = -np.linalg.solve(G + np.diag(w**-2), g)
        t = 1.0
        while (w + t * step <= 0).any() or f(w + t * step) > f(w) + 0.25 * t * g @ step:
            t *= 0.5
        w = w + t * step
    return w


def sq_dist(a, b, G) -> float:
    """|Jᵀa − Jᵀb|²: the distance between two aggregates, from the Gramian."""
    d = torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)
    return float(d @ G @ d)


# ----------------------------------------------------------------------------------------------
# solvers


@pytest.mark.parametrize("kind,T", cases(sizes=(2, 3, 6, 9)))
def test_nnls_matches_enumeration(kind, T):
    J = make_jacobian(kind, T, P=6)
    rng = np.random.default_rng(T)
    Q = gram(J).numpy()
    q = (J.numpy() @ rng.standard_normal((6, 3))).T  # rows Aᵀb with A = Jᵀ: a bounded problem
    x = solvers.nnls_gram(torch.tensor(Q), torch.tensor(q)).numpy()
    assert (x >= 0).all()
    for b in range(3):
        ref = ref_nnls(Q, q[b])
        obj = lambda v: 0.5 * v @ Q @ v - q[b] @ v  # noqa: E731
        assert obj(x[b]) <= obj(ref) + 1e-10 * (1 + abs(obj(ref)))


@pytest.mark.parametrize("kind,T", cases(sizes=(2, 3, 6, 9)))
def test_nnls_host_steps_equal_the_batched_steps(kind, T, monkeypatch):
    """The CPU path (Python control flow, row by row) and the batched path (fixed iterations, used on
    accelerators) take the same steps: same solution, also on rank-deficient and singular problems
    (P < T: more tasks than independent directions)."""
    J = make_jacobian(kind, T, P=6)
    rng = np.random.default_rng(T)
    Q = gram(J)
    q = torch.tensor((J.numpy() @ rng.standard_normal((6, 4))).T)
    host = solvers.nnls_gram(Q, q)
    monkeypatch.setattr(solvers, "_host_visible", lambda t: False)
    batched = solvers.nnls_gram(Q, q)
    torch.testing.assert_close(host, batched, rtol=1e-9, atol=1e-12)


def test_project_simplex_is_the_euclidean_projection():
    gen = torch.Generator().manual_seed(0)
    Y = torch.randn(50, 7, generator=gen, dtype=torch.float64) * 3
    X = solvers.project_simplex(Y)
    assert torch.allclose(X.sum(-1), torch.ones(50, dtype=torch.float64))
    assert (X >= 0).all()
    # Optimality: Y − X = θ1 − μ with μ >= 0 and μ_i X_i = 0, i.e. (Y − X)_i = θ where X_i > 0
    # and <= θ where X_i = 0.
    R = Y - X
    for r, x in zip(R, X):
        theta = r[x > 0]
        assert torch.allclose(theta, theta[0].expand_as(theta), atol=1e-12)
        assert (r[x == 0] <= theta[0] + 1e-12).all()


def test_simplex_newton_on_a_quadratic_finds_the_min_norm_point():
    G = gram(make_jacobian("random", 6, P=4))
    w = solvers.simplex_newton(lambda W: ((W @ G) * W).sum(-1), lambda w: (2 * G @ w, 2 * G),
                               torch.full((6,), 1 / 6, dtype=torch.float64), iters=30)
    assert sq_dist(w, solvers.min_norm_simplex(G), G) < 1e-12 * G.diagonal().max()


@pytest.mark.parametrize("kind,T", [("conflicting", 3), ("duplicated", 4), ("zero", 6), ("random", 8)])
def test_fixed_budget_equals_early_exit(kind, T, monkeypatch):
    """On CUDA the loops run their full budget; on CPU they stop once converged. Same result."""
    G = gram(make_jacobian(kind, T))
    early = {n: AGGREGATORS[n]().weights(G, torch.Generator().manual_seed(3)) for n in GRAMIAN_METHODS}
    monkeypatch.setattr(solvers, "_host_visible", lambda t: False)
    for n in GRAMIAN_METHODS:
        full = AGGREGATORS[n]().weights(G, torch.Generator().manual_seed(3))
        assert torch.allclose(full, early[n], rtol=1e-7, atol=1e-9), n


@pytest.mark.parametrize("name", DEVICE_SOLVABLE)
def test_weights_read_no_value_back_to_the_host(name, monkeypatch):
    """With the CPU-only early exits off (as on CUDA), nothing reads a tensor value (.item(),
    bool(tensor), indexing with a tensor scalar): no host synchronisation on an accelerator."""
    monkeypatch.setattr(solvers, "_host_visible", lambda t: False)
    G = gram(make_jacobian("conflicting", 4))
    variants = {"mgda": [{}, {"solver": "frank_wolfe", "iters": 3}, {"normalization": "l2"}],
                "alignedmtl": [{"scale_mode": m} for m in ("min", "median", "rmse")],
                "upgrad": [{}, {"pref_vector": [0.1, 0.2, 0.3, 0.4]}]}.get(name, [{}])
    for kw in variants:
        agg = AGGREGATORS[name](**kw)
        with NoHostRead():
            agg.weights(G, torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------
# MGDA


@pytest.mark.parametrize("kind,T", cases())
def test_mgda_is_the_min_norm_point_of_the_convex_hull(kind, T):
    J = make_jacobian(kind, T)
    G = gram(J)
    w = MGDA().weights(G)
    assert w.dtype == torch.float64
    assert (w >= 0).all() and abs(float(w.sum()) - 1) < 1e-12
    scale = float(G.diagonal().max())
    # Same point as the generic solver (the point is unique, the weights need not be).
    ref = ref_min_norm(G.numpy())
    assert sq_dist(w, ref, G) <= 1e-11 * scale
    # KKT: <g_t, d> >= |d|² for every t, with equality where w_t > 0.
    d = J.T @ w
    dd = float(d @ d)
    proj = J @ d
    assert (proj >= dd - 1e-9 * scale).all()
    assert torch.allclose(proj[w > 1e-9], torch.full_like(proj[w > 1e-9], dd), atol=1e-8 * scale)
    if kind == "zero":  # a zero gradient is in the hull: the min-norm point is 0
        assert dd <= 1e-12 * scale


@pytest.mark.parametrize("kind", KINDS)
def test_mgda_frank_wolfe_converges_to_the_exact_solution(kind):
    G = gram(make_jacobian(kind, 5))
    exact = MGDA().weights(G)
    fw = MGDA(solver="frank_wolfe").weights(G)
    few = MGDA(solver="frank_wolfe", iters=5).weights(G)
    assert (fw >= 0).all() and abs(float(fw.sum()) - 1) < 1e-12
    opt = float(exact @ G @ exact)
    scale = float(G.diagonal().max())
    assert float(fw @ G @ fw) - opt <= 1e-3 * scale
    assert float(fw @ G @ fw) <= float(few @ G @ few) + 1e-12 * scale


def test_mgda_l2_normalisation_solves_on_unit_gradients():
    J = make_jacobian("random", 4)
    U = J / J.norm(dim=1, keepdim=True)
    w = MGDA(normalization="l2").weights(gram(J))
    assert sq_dist(w, ref_min_norm(gram(U).numpy()), gram(U)) < 1e-12


def test_mgda_two_tasks_closed_form():
    J = make_jacobian("conflicting", 2)
    g1, g2 = J
    gamma = float(((g2 - g1) @ g2) / ((g1 - g2) @ (g1 - g2)))  # Sener & Koltun, Algorithm 1
    w = MGDA().weights(gram(J))
    assert torch.allclose(w, torch.tensor([gamma, 1 - gamma], dtype=torch.float64), atol=1e-12)


# ----------------------------------------------------------------------------------------------
# UPGrad


@pytest.mark.parametrize("kind,T", cases())
def test_upgrad_projections_match_generic_solver(kind, T):
    J = make_jacobian(kind, T)
    G = gram(J)
    w = UPGrad(norm_eps=0.0, reg_eps=0.0).weights(G)
    Gn = (G / G.diagonal().sum()).numpy()
    ref = sum(ref_dual_cone(Gn, np.eye(T)[i] / T) for i in range(T))
    assert sq_dist(w, ref, G) <= 1e-10 * float(G.diagonal().max())
    # The aggregate conflicts with no task.
    assert (J @ (J.T @ w) >= -1e-9 * float(G.diagonal().max())).all()


@pytest.mark.parametrize("kind,T", cases(sizes=(3, 5)))
def test_upgrad_default_regularisation_matches_torchjd_formula(kind, T):
    J = make_jacobian(kind, T)
    G = gram(J)
    w = UPGrad().weights(G)  # norm_eps = reg_eps = 1e-4 as in torchjd
    Gt = (G / G.diagonal().sum()).numpy() + 1e-4 * np.eye(T)
    ref = sum(ref_dual_cone(Gt, np.eye(T)[i] / T) for i in range(T))
    assert sq_dist(w, ref, torch.tensor(Gt)) <= 1e-12
    # Near-conflict-free: <g_t, d> >= −reg_eps·tr(G)·w_t.
    d = J.T @ w
    assert (J @ d >= -1e-4 * float(G.diagonal().sum()) * w.abs() - 1e-9).all()


def test_upgrad_without_conflict_is_the_weighted_mean_and_pref_vector():
    J = make_jacobian("aligned", 4)
    G = gram(J)
    assert (G > 0).all()  # every gradient already lies in the dual cone
    assert torch.allclose(UPGrad(reg_eps=0.0).weights(G), torch.full((4,), 0.25, dtype=torch.float64))
    p = [0.1, 0.2, 0.3, 0.4]
    assert torch.allclose(UPGrad(pref_vector=p, reg_eps=0.0).weights(G), torch.tensor(p, dtype=torch.float64))
    with pytest.raises(ValueError, match="pref_vector has 4 entries for 3 tasks"):
        UPGrad(pref_vector=p).weights(G[:3, :3])


# ----------------------------------------------------------------------------------------------
# PCGrad


def pcgrad_reference(J: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 of Yu et al. on the gradient vectors themselves."""
    out = torch.zeros(J.shape[1], dtype=J.dtype)
    for i in range(J.shape[0]):
        g = J[i].clone()
        for j in orders[i].tolist():
            dot = g @ J[j]
            if dot < 0 and J[j].norm() > 0:
                g = g - dot / (J[j] @ J[j]) * J[j]
        out += g
    return out


@pytest.mark.parametrize("kind,T", cases())
def test_pcgrad_matches_sequential_projections(kind, T):
    J = make_jacobian(kind, T)
    d = PCGrad().aggregate(J, torch.Generator().manual_seed(11))
    orders = PCGrad.task_orders(T, torch.Generator().manual_seed(11))
    assert sorted(orders[0].tolist()) == list(range(1, T))
    ref = pcgrad_reference(J, orders)
    assert torch.allclose(d, ref, rtol=1e-9, atol=1e-9 * float(J.norm()))
    mean = PCGrad(reduction="mean").aggregate(J, torch.Generator().manual_seed(11))
    assert torch.allclose(mean, ref / T, rtol=1e-9, atol=1e-9 * float(J.norm()))


def test_pcgrad_two_tasks_textbook_formula():
    J = make_jacobian("conflicting", 2)
    g1, g2 = J
    assert g1 @ g2 < 0
    expected = (g1 - (g1 @ g2) / (g2 @ g2) * g2) + (g2 - (g1 @ g2) / (g1 @ g1) * g1)
    assert torch.allclose(PCGrad().aggregate(J), expected, atol=1e-10)
    J2 = make_jacobian("aligned", 2)
    assert J2[0] @ J2[1] > 0
    assert torch.allclose(PCGrad().aggregate(J2), J2.sum(0), atol=1e-10)


def test_pcgrad_random_order_comes_from_the_generator():
    G = gram(make_jacobian("conflicting", 6))
    a = PCGrad().weights(G, torch.Generator().manual_seed(5))
    b = PCGrad().weights(G, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    draws = {tuple(PCGrad().weights(G, torch.Generator().manual_seed(s)).tolist()) for s in range(8)}
    assert len(draws) > 1  # with conflicts, the order matters


# ----------------------------------------------------------------------------------------------
# CAGrad


def cagrad_objective(G, b, phi, eps, W):
    return W @ b + phi * (((W @ G) * W).sum(-1).clamp_min(0) + eps).sqrt()


def ref_cagrad_dual(G, b, phi, eps, iters=4000):
    """Accelerated projected gradient with backtracking (numpy), a generic first-order solver."""
    G, b, phi = G.numpy(), b.numpy(), float(phi)
    T = len(b)
    f = lambda w: w @ b + phi * np.sqrt(max(w @ G @ w, 0) + eps)  # noqa: E731
    grad = lambda w: b + phi * G @ w / np.sqrt(max(w @ G @ w, 0) + eps)  # noqa: E731
    proj = lambda y: solvers.project_simplex(torch.tensor(y)[None])[0].numpy()  # noqa: E731
    x = y = np.full(T, 1 / T)
    t, L = 1.0, 1.0
    best = x
    for _ in range(iters):
        gy = grad(y)
        while True:
            xn = proj(y - gy / L)
            if f(xn) <= f(y) + gy @ (xn - y) + 0.5 * L * (xn - y) @ (xn - y) + 1e-15:
                break
            L *= 2
        tn = (1 + np.sqrt(1 + 4 * t * t)) / 2
        y = xn + (t - 1) / tn * (xn - x)
        x, t = xn, tn
        if f(x) < f(best):
            best = x
    return best


@pytest.mark.parametrize("kind,T", cases(sizes=(2, 3, 5)))
def test_cagrad_dual_is_optimal(kind, T):
    J = make_jacobian(kind, T)
    a = CAGrad()
    G, b, phi = a._problem(gram(J))
    w = a.dual_weights(gram(J))
    assert (w >= 0).all() and abs(float(w.sum()) - 1) < 1e-12
    # Frank–Wolfe gap: a certificate that F(w) − F* <= gap.
    Gw = G @ w
    g = b + phi * Gw / ((w @ Gw).clamp_min(0) + a.eps).sqrt()
    assert float(w @ g - g.min()) <= 1e-5
    ref = torch.tensor(ref_cagrad_dual(G, b, phi, a.eps, iters=1500))
    assert cagrad_objective(G, b, phi, a.eps, w) <= cagrad_objective(G, b, phi, a.eps, ref) + 1e-10


@pytest.mark.parametrize("kind", ("random", "conflicting", "aligned", "duplicated"))
def test_cagrad_direction_maximises_the_worst_task_in_the_ball(kind):
    # (With a zero task gradient the dual optimum has g_w = 0 and the recovery formula gives g_0,
    # as in the authors' code; the max-min value is then 0 and not attained by g_0 in general.)
    J = make_jacobian(kind, 4, P=3)
    c = 0.4
    w = CAGrad(c=c, rescale=0).weights(gram(J))
    d = J.T @ w
    g0 = J.mean(0)
    radius = c * float(g0.norm())
    assert abs(float((d - g0).norm()) - radius) <= 1e-4 * radius + 1e-12
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    z = z / z.norm(dim=1, keepdim=True) * torch.rand(4000, 1, generator=gen, dtype=torch.float64) ** (1 / 3)
    others = g0 + radius * z  # uniform in the ball
    best_other = (others @ J.T).min(1).values.max()
    assert float((J @ d).min()) >= float(best_other) - 1e-6 * float(J.norm()) ** 2


@pytest.mark.parametrize("kind,T", cases(sizes=(2, 5, 10)))
def test_cagrad_with_c_zero_is_the_mean_gradient(kind, T):
    J = make_jacobian(kind, T)
    assert torch.allclose(CAGrad(c=0.0).aggregate(J), J.mean(0), atol=1e-12)


def test_cagrad_rescale_and_scale_invariance():
    J = make_jacobian("conflicting", 5)
    w0 = CAGrad(rescale=0).weights(gram(J))
    assert torch.allclose(CAGrad(rescale=1).weights(gram(J)), w0 / (1 + 0.4**2))
    assert torch.allclose(CAGrad(rescale=2).weights(gram(J)), w0 / 1.4)
    assert torch.allclose(CAGrad().weights(gram(1e-3 * J)), CAGrad().weights(gram(J)), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Nash-MTL


@pytest.mark.parametrize("kind,T", cases(kinds=("random", "conflicting", "aligned", "duplicated")))
def test_nashmtl_solves_the_bargaining_equation(kind, T):
    J = make_jacobian(kind, T)
    G = gram(J)
    w = NashMTL(max_norm=0.0).weights(G)
    assert (w > 0).all()
    assert torch.allclose(G @ w, 1 / w, rtol=1e-8)
    assert torch.allclose(w, torch.tensor(ref_nash(G.numpy())), rtol=1e-7)
    assert abs(float(w @ G @ w) - T) < 1e-6 * T  # |d|² = Σ w_i (Gw)_i = T


def test_nashmtl_zero_task_and_clipping():
    J = make_jacobian("zero", 5)
    G = gram(J)
    w = NashMTL(max_norm=0.0).weights(G)
    zero = 5 // 2
    assert w[zero] == 0 and torch.isfinite(w).all()
    keep = [i for i in range(5) if i != zero]
    assert torch.allclose(w[keep], torch.tensor(ref_nash(G[keep][:, keep].numpy())), rtol=1e-7)
    # Default max_norm = 1 (authors' clip_grad_norm_): the aggregate has norm min(1, sqrt(T)).
    d = NashMTL().aggregate(J)
    assert abs(float(d.norm()) - 1.0) < 1e-9
    assert abs(float(NashMTL(max_norm=10.0).aggregate(J).norm()) - 2.0) < 1e-6  # sqrt(4 active)


# ----------------------------------------------------------------------------------------------
# IMTL-G


@pytest.mark.parametrize("kind,T", cases())
def test_imtlg_projections_on_unit_gradients_are_equal(kind, T):
    J = make_jacobian(kind, T)
    w = IMTLG().weights(gram(J))
    assert abs(float(w.sum()) - 1) < 1e-9
    d = J.T @ w
    norms = J.norm(dim=1)
    nz = norms > 0
    proj = (J[nz] @ d) / norms[nz]
    assert torch.allclose(proj, proj.mean().expand_as(proj), rtol=1e-7, atol=1e-9 * float(norms.max()))
    assert (w[~nz] == 0).all()
    assert float(w.abs().max()) < 1e3  # duplicated gradients: any split is a solution, none blows up


def test_imtlg_matches_the_papers_closed_form():
    for T in (2, 3, 6):
        J = make_jacobian("conflicting", T)
        U = J / J.norm(dim=1, keepdim=True)
        D, Ud = J[0] - J[1:], U[0] - U[1:]
        a = J[0] @ Ud.T @ torch.linalg.inv(D @ Ud.T)  # α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹
        ref = torch.cat([1 - a.sum(0, keepdim=True), a])
        assert torch.allclose(IMTLG().weights(gram(J)), ref, rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Aligned-MTL


def procrustes_reference(J: torch.Tensor, scale_mode: str = "min") -> torch.Tensor:
    """The authors' ProcrustesSolver on the gradients [P,T] (float64), returns the weights W·1."""
    grads = J.T
    cov = grads.T @ grads
    lam, V = torch.linalg.eigh(cov)
    tol = lam.max() * cov.shape[0] * torch.finfo(torch.float32).eps
    rank = int((lam > tol).sum())
    order = torch.argsort(lam, descending=True)
    lam, V = lam[order][:rank], V[:, order][:, :rank]
    scale = {"min": lam[-1], "median": torch.median(lam), "rmse": lam.mean()}[scale_mode]
    W = (V * scale.sqrt() / lam.sqrt()) @ V.T
    return W.sum(-1)


@pytest.mark.parametrize("kind,T", cases(kinds=("random", "conflicting", "aligned", "duplicated")))
@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
def test_alignedmtl_matches_authors_solver(kind, T, mode):
    J = make_jacobian(kind, T)
    ref = procrustes_reference(J, mode)
    w = AlignedMTL(scale_mode=mode).weights(gram(J))
    assert torch.allclose(w, ref, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("kind,T", cases(kinds=("random", "conflicting", "duplicated")))
def test_alignedmtl_components_are_orthogonal_with_equal_norms(kind, T):
    J = make_jacobian(kind, T)
    G = gram(J)
    W = AlignedMTL().transform(G)
    aligned = W.T @ J  # row k: aligned gradient k
    C = aligned @ aligned.T
    lam = torch.linalg.eigvalsh(G)
    kept = lam[lam > lam.max() * T * torch.finfo(torch.float32).eps]
    sigma2 = kept.min()  # the smallest (kept) squared singular value of J
    rank = len(kept)
    # Wᵀ G W = σ² × (projector on the range of G): eigenvalues σ² (rank times) and 0.
    ev = torch.linalg.eigvalsh(C)
    assert torch.allclose(ev[T - rank:], sigma2.expand(rank), rtol=1e-6)
    assert (ev[: T - rank].abs() <= 1e-9 * float(sigma2)).all()
    if rank == T:
        assert torch.allclose(C, sigma2 * torch.eye(T, dtype=C.dtype), atol=1e-8 * float(sigma2))
    assert torch.allclose(AlignedMTL().aggregate(J), aligned.sum(0), rtol=1e-9, atol=1e-9 * float(J.norm()))


# ----------------------------------------------------------------------------------------------
# all methods


@pytest.mark.parametrize("name", GRAMIAN_METHODS)
@pytest.mark.parametrize("kind,dtype", [("random", torch.float32), ("conflicting", torch.float64)])
def test_aggregate_through_chunks_equals_flat(name, kind, dtype):
    J = make_jacobian(kind, 4, P=70).to(dtype)
    chunks = [J[:, :30].reshape(4, 5, 6).contiguous(), J[:, 30:31].contiguous(),
              J[:, 31:].reshape(4, 3, 13).contiguous()]
    agg = AGGREGATORS[name]()
    flat = agg.aggregate(J, torch.Generator().manual_seed(2))
    parts = agg.aggregate(chunks, torch.Generator().manual_seed(2))
    assert [p.shape for p in parts] == [c.shape[1:] for c in chunks]
    assert all(p.dtype == dtype for p in parts) and flat.shape == (70,) and flat.dtype == dtype
    joined = torch.cat([p.reshape(-1) for p in parts])
    # The two Gramians differ by summation order only: float32 rounding, relative to |g|.
    tol = (1e-5 if dtype == torch.float32 else 1e-9) * float(J.abs().max())
    assert torch.allclose(joined, flat, rtol=0, atol=tol)
    w64 = agg.weights(gram(J.double()), torch.Generator().manual_seed(2))
    assert torch.allclose(flat.double(), J.double().T @ w64, rtol=0, atol=tol)


@pytest.mark.parametrize("name", GRAMIAN_METHODS)
@pytest.mark.parametrize("T", [1, 2, 5])
def test_zero_gradients_give_finite_weights(name, T):
    agg = AGGREGATORS[name]()
    for J in (torch.zeros(T, 10), make_jacobian("zero", T).float()):
        w = agg.weights(gram(J), torch.Generator().manual_seed(0))
        d = agg.aggregate(J, torch.Generator().manual_seed(0))
        assert w.shape == (T,) and torch.isfinite(w).all() and torch.isfinite(d).all()
    assert agg.aggregate(torch.zeros(T, 10)).abs().max() == 0


@pytest.mark.parametrize("name", GRAMIAN_METHODS)
def test_dtype_device_and_bad_input(name):
    agg = AGGREGATORS[name]()
    G = gram(make_jacobian("random", 3))
    assert agg.weights(G).dtype == torch.float64
    assert agg.weights(G.float()).dtype == torch.float32
    assert agg.weights(G.half()).dtype == torch.float32
    w1 = agg.weights(G[:1, :1])
    assert w1.shape == (1,) and torch.isfinite(w1).all()
    with pytest.raises(ValueError, match="square Gramian"):
        agg.weights(torch.zeros(3, 4))
    assert name in repr(agg).lower().replace("-", "")


def test_constructor_arguments_are_checked():
    with pytest.raises(ValueError, match="reduction"):
        PCGrad(reduction="max")
    with pytest.raises(ValueError, match="normalization"):
        MGDA(normalization="loss+")
    with pytest.raises(ValueError, match="solver"):
        MGDA(solver="cvxpy")
    with pytest.raises(ValueError, match="rescale"):
        CAGrad(rescale=3)
    with pytest.raises(ValueError, match="scale_mode"):
        AlignedMTL(scale_mode="max")
    with pytest.raises(ValueError, match="max_norm"):
        NashMTL(max_norm=-1)
