"""ConFIG, DualProj, FairGrad and GradVac against independent references.

The references work on explicit gradient vectors J [T,P] (float64), not on the Gramian: least squares
on the unit vectors (``torch.linalg.lstsq``) for ConFIG, a generic QP solver (scipy SLSQP) and the
KKT conditions in parameter space for DualProj, scipy's ``least_squares`` (the authors' solver) and
the residual of the defining equations for FairGrad, and a direct loop over the vectors (LibMTL's
algorithm) for GradVac.
"""

from __future__ import annotations

import copy
import functools
import io
import math

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares, nnls

from mtvision.balancing import (
    AGGREGATORS,
    ConFIG,
    DualProj,
    FairGrad,
    GradVac,
    NashMTL,
    PCGrad,
    build_balancer,
    solvers,
)

from . import helpers
from .helpers import NoHostRead, gram

KINDS = ("random", "conflicting", "identical", "duplicated", "zero", "opposed", "scales")
SIZES = (2, 3, 5, 10)
NEW = ("config", "dualproj", "fairgrad", "gradvac")


make_jacobian = functools.partial(helpers.make_jacobian, kinds=KINDS)  # [T,P] float64 of a structure
cases = functools.partial(helpers.cases, sizes=SIZES, kinds=KINDS)


def assert_vec_close(a: torch.Tensor, b: torch.Tensor, rel: float, scale: float | None = None):
    """|a − b| <= rel · scale (default: the larger norm, at least 1e-300)."""
    if scale is None:
        scale = max(float(a.norm()), float(b.norm()), 1e-300)
    err = float((a - b).norm())
    assert err <= rel * scale, f"|a-b| = {err:.3e} > {rel:.1e} * {scale:.3e}"


# ----------------------------------------------------------------------------------------------
# ConFIG


def ref_config(J: torch.Tensor) -> torch.Tensor:
    """The authors' ConFIG_update in parameter space: min-norm least squares on the unit vectors."""
    units = torch.nan_to_num(J / J.norm(dim=1, keepdim=True), nan=0.0)
    x = torch.linalg.lstsq(units, torch.ones(J.shape[0], 1, dtype=J.dtype), driver="gelsd").solution[:, 0]
    if float(x.norm()) < 1e-8:  # the direction vanishes (opposed gradients): unit_vector(0) = 0
        return torch.zeros(J.shape[1], dtype=J.dtype)
    unit = x / x.norm()
    return (J @ unit).sum() * unit


@pytest.mark.parametrize("kind,T", cases())
def test_config_matches_least_squares_on_unit_vectors(kind, T):
    J = make_jacobian(kind, T)
    w = ConFIG().weights(gram(J))
    ref = ref_config(J)
    assert_vec_close(J.T @ w, ref, 1e-8, scale=float(J.norm(dim=1).max()))
    if kind == "zero":
        assert w[T // 2] == 0


@pytest.mark.parametrize("kind,T", cases(kinds=("random", "conflicting", "scales")))
def test_config_is_conflict_free_with_equal_cosines(kind, T):
    """Full rank: the direction has the same positive cosine with every task gradient."""
    J = make_jacobian(kind, T)
    d = J.T @ ConFIG().weights(gram(J))
    cos = (J @ d) / (J.norm(dim=1) * d.norm())
    assert (cos > 0).all()
    assert torch.allclose(cos, cos.mean().expand(T), rtol=1e-8, atol=0)


def test_config_two_tasks_bisects_the_unit_vectors():
    """T = 2 (the authors' ConFIG_update_double): the direction is u1 + u2."""
    J = make_jacobian("conflicting", 2)
    u = J / J.norm(dim=1, keepdim=True)
    unit = (u[0] + u[1]) / (u[0] + u[1]).norm()
    assert_vec_close(ConFIG().aggregate(J), (J @ unit).sum() * unit, 1e-10)


@pytest.mark.parametrize("kind,T", cases(sizes=(3, 6), kinds=("random", "conflicting", "duplicated", "zero")))
def test_config_permutation_equivariance(kind, T):
    G = gram(make_jacobian(kind, T))
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(T))
    w = ConFIG().weights(G)
    assert torch.allclose(ConFIG().weights(G[perm][:, perm]), w[perm], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["random", "conflicting", "duplicated"])
@pytest.mark.parametrize("s", [1e-3, 0.5, 7.0, 1e4])
def test_config_rescaling_one_task_keeps_the_direction_and_changes_the_length(kind, s):
    """Direction from the unit vectors only; length = Σ g_i·x̂ changes by (s − 1) g_k·x̂."""
    J = make_jacobian(kind, 4)
    d = ConFIG().aggregate(J)
    unit = d / d.norm()
    J2 = J.clone()
    J2[1] *= s
    d2 = ConFIG().aggregate(J2)
    expected = d + (s - 1) * (J[1] @ unit) * unit
    assert_vec_close(d2, expected, 1e-9, scale=float(J2.norm(dim=1).max()))
    assert float(d2 @ unit) > 0 and abs(float(d2 @ d2) - float(d2 @ unit) ** 2) <= 1e-9 * float(d2 @ d2)


def test_config_opposed_gradients_and_zero_rows():
    J = make_jacobian("opposed", 2)
    assert ConFIG().weights(gram(J)).abs().max() == 0  # x = 0: no direction, update 0
    J3 = make_jacobian("zero", 3)
    w = ConFIG().weights(gram(J3))
    keep = [0, 2]
    assert w[1] == 0
    torch.testing.assert_close(w[keep], ConFIG().weights(gram(J3[keep])), rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------------------------
# DualProj


def ref_project_dual_cone(A: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The projection of m onto {x : A x >= 0} in parameter space: x = m + Aᵀλ with
    λ = argmin_{λ >= 0} |Aᵀλ + m|² (the projection onto a polyhedral cone), by scipy's NNLS on the
    explicit vectors."""
    lam = nnls(A.T, -m, maxiter=50 * A.shape[0])[0]
    return m + A.T @ lam


def assert_projection_kkt(J: torch.Tensor, p: torch.Tensor, v: torch.Tensor):
    """x = Jᵀv is the projection of Jᵀp onto {x : Jx >= 0} iff Jx >= 0, x − Jᵀp = Jᵀλ with λ = v − p
    >= 0 and λ_t (Jx)_t = 0 (KKT, in parameter space)."""
    x = J.T @ v
    lam = v - p
    Jx = J @ x
    n = J.norm(dim=1)
    tol = 1e-9 * float(n.max()) * float(x.norm() + (J.T @ p).norm())
    assert (Jx >= -tol).all() and (lam >= -1e-9 * float(v.abs().max())).all()
    assert (lam.clamp_min(0) * Jx).abs().max() <= tol * float(v.abs().max() + 1)


@pytest.mark.parametrize("kind,T", cases())
def test_dualproj_exact_projection_matches_a_generic_qp(kind, T):
    J = make_jacobian(kind, T)
    p = torch.full((T,), 1.0 / T, dtype=torch.float64)
    v = DualProj(norm_eps=0.0, reg_eps=0.0).weights(gram(J))
    assert_projection_kkt(J, p, v)
    ref = ref_project_dual_cone(J.numpy(), (J.T @ p).numpy())
    assert_vec_close(J.T @ v, torch.from_numpy(ref), 1e-6, scale=float((J.T @ p).norm()) + 1e-300)


@pytest.mark.parametrize("kind,T", cases(sizes=(2, 3, 5)))
def test_dualproj_default_regularisation_is_a_projection_with_augmented_vectors(kind, T):
    """torchjd's G/tr(G) + reg·I is the Gramian of [J/sqrt(tr), sqrt(reg) I]: DualProj is the exact
    projection for those (full-rank) vectors, so the weights are unique."""
    J = make_jacobian(kind, T)
    G = gram(J)
    tr = float(G.trace())
    A = torch.cat([J / math.sqrt(tr), math.sqrt(1e-4) * torch.eye(T, dtype=J.dtype)], 1)
    p = torch.full((T,), 1.0 / T, dtype=torch.float64)
    v = DualProj().weights(G)
    assert_projection_kkt(A, p, v)
    ref = torch.from_numpy(ref_project_dual_cone(A.numpy(), (A.T @ p).numpy()))
    v_ref = torch.linalg.lstsq(A.T, ref[:, None]).solution[:, 0]
    assert torch.allclose(v, v_ref, rtol=1e-5, atol=1e-7)


def test_dualproj_without_conflict_is_the_preference_combination():
    J = make_jacobian("random", 4).abs()  # all inner products positive
    G = gram(J)
    assert torch.allclose(DualProj().weights(G), torch.full((4,), 0.25, dtype=torch.float64))
    pref = [0.1, 0.2, 0.3, 0.4]
    assert torch.allclose(DualProj(pref_vector=pref).weights(G), torch.tensor(pref, dtype=torch.float64))
    # a Gramian with trace below norm_eps is treated as 0: the weights are p
    tiny = DualProj(pref_vector=pref).weights(G * 1e-9)
    assert torch.allclose(tiny, torch.tensor(pref, dtype=torch.float64))
    with pytest.raises(ValueError, match="pref_vector"):
        DualProj(pref_vector=[1.0, 2.0]).weights(G)


@pytest.mark.parametrize("kind", ["random", "conflicting", "opposed", "zero"])
def test_dualproj_permutation_equivariance_and_scale_invariance(kind):
    T = 5
    G = gram(make_jacobian(kind, T))
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(1))
    pref = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15], dtype=torch.float64)
    w = DualProj(pref_vector=pref).weights(G)
    assert torch.allclose(DualProj(pref_vector=pref[perm]).weights(G[perm][:, perm]), w[perm], atol=1e-10)
    assert torch.allclose(DualProj(pref_vector=pref).weights(G * 123.0), w, atol=1e-10)


def test_dualproj_projects_the_sum_once_unlike_upgrad():
    """DualProj is one projection of the mean; with two conflicting tasks the result lies on the
    boundary of the dual cone of the task whose gradient conflicts with the mean."""
    J = torch.tensor([[1.0, 0.0], [-0.9, 0.3]], dtype=torch.float64) * torch.tensor([[1.0], [3.0]])
    d = DualProj(reg_eps=0.0).aggregate(J)
    m = J.mean(0)
    i = int((J @ m).argmin())
    assert float(J[i] @ m) < 0 and abs(float(J[i] @ d)) < 1e-12 and (J @ d >= -1e-12).all()
    n = J[i] / J[i].norm()
    assert_vec_close(d, m - (m @ n) * n, 1e-12)  # the projection on the half-space boundary


# ----------------------------------------------------------------------------------------------
# FairGrad


def ref_fairgrad(G: np.ndarray, alpha: float) -> np.ndarray:
    """The authors' solver: least_squares(Gw − w^(−1/α), from 1/T, bounds (0, inf)), tight tolerances."""
    T = len(G)
    res = least_squares(lambda x: G @ x - np.power(1 / x, 1 / alpha), np.ones(T) / T, bounds=(0, np.inf),
                        xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=5000)
    return res.x


SOLVABLE = ("random", "conflicting", "identical", "duplicated", "scales")


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("kind,T", cases(kinds=SOLVABLE))
def test_fairgrad_solves_the_alpha_fair_equations(kind, T, alpha):
    J = make_jacobian(kind, T)
    G = gram(J)
    w = FairGrad(alpha=alpha).weights(G)
    assert (w > 0).all()
    target = w ** (-1 / alpha)
    assert torch.allclose(G @ w, target, rtol=1e-9, atol=0), (G @ w / target - 1).abs().max()


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("kind,T", cases(sizes=(2, 3, 5), kinds=("random", "conflicting", "duplicated")))
def test_fairgrad_matches_the_authors_least_squares(kind, T, alpha):
    J = make_jacobian(kind, T)
    G = gram(J)
    w = FairGrad(alpha=alpha).weights(G).numpy()
    ref = ref_fairgrad(G.numpy(), alpha)
    assert np.allclose(w, ref, rtol=1e-6, atol=0), (w, ref)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("s", [1e-6, 0.3, 40.0, 1e8])
def test_fairgrad_scaling_of_the_gramian(alpha, s):
    G = gram(make_jacobian("conflicting", 4))
    w = FairGrad(alpha=alpha).weights(G)
    assert torch.allclose(FairGrad(alpha=alpha).weights(G * s), w * s ** (-alpha / (alpha + 1)), rtol=1e-10)


@pytest.mark.parametrize("kind", ["random", "conflicting", "zero"])
def test_fairgrad_alpha_one_is_the_nash_bargaining_solution(kind):
    G = gram(make_jacobian(kind, 5))
    w = FairGrad(alpha=1.0).weights(G)
    assert torch.allclose(w, NashMTL(max_norm=0).weights(G), rtol=1e-8, atol=0)
    assert torch.allclose(w * (G @ w), (w > 0).double(), rtol=1e-9, atol=0)


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_fairgrad_zero_task_gets_weight_zero(alpha):
    J = make_jacobian("zero", 5)
    w = FairGrad(alpha=alpha).weights(gram(J))
    keep = [0, 1, 3, 4]
    assert w[2] == 0
    assert np.allclose(w[keep].numpy(), ref_fairgrad(gram(J[keep]).numpy(), alpha), rtol=1e-6)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_without_a_solution_returns_a_finite_point(alpha):
    """Opposed gradients: no positive solution. The pair's weights grow until the weighted gradients
    cancel to 1e-4 of their norms and are then held: finite positive weights. A third gradient
    orthogonal to the pair gets its own solution |g_3|^(−2α/(α+1))."""
    J2 = make_jacobian("opposed", 2)
    w2 = FairGrad(alpha=alpha).weights(gram(J2))
    assert torch.isfinite(w2).all() and (w2 > 0).all() and w2.max() < 1e9
    parts = (w2[:, None] * J2).norm(dim=1)
    assert float((J2.T @ w2).norm()) <= 1.01e-4 * float(parts.norm())
    J = torch.zeros(3, 6, dtype=torch.float64)
    J[0, :3] = torch.tensor([1.0, 2.0, -1.0])
    J[1] = -3.0 * J[0]
    J[2, 4] = 2.0
    w = FairGrad(alpha=alpha).weights(gram(J))
    assert torch.isfinite(w).all() and (w > 0).all() and w.max() < 1e9
    assert math.isclose(float(w[2]), 4.0 ** (-alpha / (alpha + 1)), rel_tol=1e-9)
    parts = (w[:, None] * J).norm(dim=1)
    assert float((J.T @ w - w[2] * J[2]).norm()) <= 1.01e-4 * float(parts.norm())


@pytest.mark.parametrize("kind,T", cases(sizes=(2, 3, 6), kinds=("random", "conflicting", "zero", "scales")))
def test_fairgrad_host_and_batched_steps_agree(kind, T, monkeypatch):
    G = gram(make_jacobian(kind, T))
    host = FairGrad(alpha=2.0).weights(G)
    monkeypatch.setattr(solvers, "_host_visible", lambda t: False)
    batched = FairGrad(alpha=2.0).weights(G)
    torch.testing.assert_close(host, batched, rtol=1e-9, atol=0)


def test_fairgrad_permutation_equivariance():
    G = gram(make_jacobian("conflicting", 6))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    w = FairGrad(alpha=0.7).weights(G)
    assert torch.allclose(FairGrad(alpha=0.7).weights(G[perm][:, perm]), w[perm], rtol=1e-10)


# ----------------------------------------------------------------------------------------------
# GradVac


def ref_gradvac_step(J: torch.Tensor, rho: torch.Tensor, orders: torch.Tensor, beta: float):
    """LibMTL's GradVac (group_type 0) on explicit vectors, with the given orders, and the documented
    rule that a vaccinated gradient cancelled to |g^PC| <= 1e-5 Σ|c_k||g_k| counts as zero for φ.
    Returns the aggregate and the new targets."""
    T = J.shape[0]
    rho = rho.clone()
    pc = J.clone()
    norms = J.norm(dim=1).tolist()
    for i in range(T):
        bound = norms[i]  # Σ_k |c_k| |g_k| of pc[i]
        for j in orders[i].tolist():
            n_i = float(pc[i].norm()) if float(pc[i].norm()) > 1e-5 * bound else 0.0
            r = (float(pc[i] @ J[j]) if n_i > 0 else 0.0) / (n_i * norms[j] + 1e-8)
            t = float(rho[i, j])
            if r < t and norms[j] > 0:
                w = n_i * (t * math.sqrt(max(1 - r * r, 0.0)) - r * math.sqrt(1 - t * t)) / (
                    norms[j] * math.sqrt(1 - t * t) + 1e-8)
                pc[i] = pc[i] + w * J[j]
                bound += abs(w) * norms[j]
            rho[i, j] = (1 - beta) * t + beta * r
    return pc.sum(0), rho


def step_jacobians(kind: str, T: int, steps: int) -> list[torch.Tensor]:
    """A drifting sequence of Jacobians (the same structure, perturbed each step)."""
    J = make_jacobian(kind, T)
    gen = torch.Generator().manual_seed(T)
    out = []
    for _ in range(steps):
        out.append(J.clone())
        J = J + 0.3 * J.norm(dim=1, keepdim=True) / math.sqrt(J.shape[1]) * torch.randn(
            J.shape, generator=gen, dtype=J.dtype) * (J.norm(dim=1, keepdim=True) > 0)
    return out


@pytest.mark.parametrize("beta", [0.5, 0.01, 1.0])
@pytest.mark.parametrize("kind,T", cases(sizes=(2, 3, 5, 10), kinds=("random", "conflicting", "duplicated",
                                                                        "zero", "opposed", "scales")))
def test_gradvac_matches_the_loop_over_vectors(kind, T, beta):
    agg = GradVac(beta=beta)
    gen, gen_ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    rho = torch.zeros(T, T, dtype=torch.float64)
    for J in step_jacobians(kind, T, 4):
        w = agg.weights(gram(J), gen)
        ref, rho = ref_gradvac_step(J, rho, PCGrad.task_orders(T, gen_ref), beta)
        assert_vec_close(J.T @ w, ref, 1e-8, scale=float(J.norm(dim=1).sum()))
        assert torch.allclose(agg.state_dict()["targets"], rho, rtol=0, atol=1e-8)


@pytest.mark.parametrize("kind", ["conflicting", "random"])
def test_gradvac_first_step_projects_like_pcgrad(kind):
    """Targets 0: only conflicting pairs change, by the PCGrad projection (up to the 1e-8's)."""
    J = make_jacobian(kind, 5)
    G = gram(J)
    w = GradVac().weights(G, torch.Generator().manual_seed(9))
    w_pc = PCGrad().weights(G, torch.Generator().manual_seed(9))
    assert_vec_close(J.T @ w, J.T @ w_pc, 1e-7)


def test_gradvac_state_round_trip_continues_identically():
    Js = step_jacobians("conflicting", 4, 6)
    agg = GradVac(beta=0.3)
    assert agg.state_dict() == {}
    gen = torch.Generator().manual_seed(0)
    for J in Js[:2]:
        agg.weights(gram(J), gen)
    buf = io.BytesIO()
    torch.save(agg.state_dict(), buf)
    buf.seek(0)
    other = GradVac(beta=0.3)
    other.load_state_dict(torch.load(buf))
    gen2 = torch.Generator().manual_seed(0)
    gen2.set_state(gen.get_state())
    for J in Js[2:]:
        a, b = agg.weights(gram(J), gen), other.weights(gram(J), gen2)
        assert torch.equal(a, b)
        assert torch.equal(agg.state_dict()["targets"], other.state_dict()["targets"])
    assert agg.state_dict()["targets"].dtype == torch.float64
    # the saved state is a copy: stepping again does not change it
    saved = agg.state_dict()
    agg.weights(gram(Js[0]), gen)
    assert not torch.equal(saved["targets"], agg.state_dict()["targets"])


def test_gradvac_state_is_used_and_sized_once():
    J = make_jacobian("conflicting", 3)
    agg = GradVac()
    fresh = agg.weights(gram(J), torch.Generator().manual_seed(0))
    again = agg.weights(gram(J), torch.Generator().manual_seed(0))
    assert not torch.allclose(fresh, again)  # the targets moved: a different step
    with pytest.raises(ValueError, match="targets are for 3 tasks"):
        agg.weights(gram(make_jacobian("random", 4)))
    agg.load_state_dict({})
    assert agg.state_dict() == {}
    assert torch.equal(agg.weights(gram(J), torch.Generator().manual_seed(0)), fresh)
    with pytest.raises(ValueError, match=r"\[T,T\]"):
        agg.load_state_dict({"targets": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="beta"):
        GradVac(beta=1.5)


def test_gradvac_order_comes_from_the_generator():
    J = make_jacobian("conflicting", 5)
    G = gram(J)
    a = GradVac().weights(G, torch.Generator().manual_seed(1))
    b = GradVac().weights(G, torch.Generator().manual_seed(1))
    others = [GradVac().weights(G, torch.Generator().manual_seed(s)) for s in range(2, 8)]
    assert torch.equal(a, b)
    assert any(not torch.allclose(a, o) for o in others)
    assert GradVac.stochastic and not ConFIG.stochastic and not FairGrad.stochastic


# ----------------------------------------------------------------------------------------------
# all four


BUILD_KW = {"config": {}, "dualproj": {"pref_vector": [0.2, 0.5, 0.3], "reg_eps": 0.0},
            "fairgrad": {"alpha": 2.0}, "gradvac": {"beta": 0.25}}


@pytest.mark.parametrize("name", NEW)
def test_build_balancer_and_aggregate_is_jacobian_transpose_weights(name):
    agg = build_balancer(name, 3, **BUILD_KW[name])
    assert AGGREGATORS[name] is type(agg)
    for k, v in BUILD_KW[name].items():
        assert getattr(agg, k) == v
    J = make_jacobian("conflicting", 3)
    twin = copy.deepcopy(agg)
    d = agg.aggregate(J, torch.Generator().manual_seed(4))
    w = twin.weights(gram(J), torch.Generator().manual_seed(4))
    assert_vec_close(d, J.T @ w, 1e-12)
    with pytest.raises(ValueError, match="balancer.kwargs"):
        build_balancer(name, 3, not_an_argument=1)


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("T", [1, 2, 5])
def test_degenerate_inputs_give_finite_weights(name, T):
    for J in (torch.zeros(T, 10, dtype=torch.float64), make_jacobian("zero", T),
              make_jacobian("identical", T), make_jacobian("opposed", max(T, 2))[:T]):
        w = AGGREGATORS[name]().weights(gram(J), torch.Generator().manual_seed(0))
        assert w.shape == (T,) and torch.isfinite(w).all(), (J, w)
    assert AGGREGATORS[name]().aggregate(torch.zeros(T, 10)).abs().max() == 0
    one = AGGREGATORS[name]().weights(gram(make_jacobian("random", 1)))
    assert one.shape == (1,) and float(one) > 0


@pytest.mark.parametrize("name", NEW)
def test_identical_gradients(name):
    """T identical gradients g: ConFIG and GradVac give T g, DualProj the mean g, FairGrad (α = 1)
    equal weights with T|g|² w = 1/w."""
    T = 4
    J = make_jacobian("identical", T)
    d = AGGREGATORS[name]().aggregate(J, torch.Generator().manual_seed(0))
    n2 = float(J[0] @ J[0])
    factor = {"config": T, "gradvac": T, "dualproj": 1.0, "fairgrad": T * (n2 * T) ** -0.5}[name]
    assert_vec_close(d, factor * J[0], 1e-9)


@pytest.mark.parametrize("name", NEW)
def test_dtypes_and_bad_input(name):
    G = gram(make_jacobian("random", 3))
    assert AGGREGATORS[name]().weights(G).dtype == torch.float64
    assert AGGREGATORS[name]().weights(G.float()).dtype == torch.float32
    with pytest.raises(ValueError, match="square Gramian"):
        AGGREGATORS[name]().weights(torch.zeros(3, 4))
    assert name in repr(AGGREGATORS[name]()).lower()


def test_constructor_arguments_are_checked():
    with pytest.raises(ValueError, match="alpha"):
        FairGrad(alpha=0.0)
    with pytest.raises(ValueError, match="iters"):
        FairGrad(iters=0)
    with pytest.raises(ValueError, match="reg_eps"):
        DualProj(reg_eps=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        solvers.fair_allocation(torch.eye(2), alpha=-1.0)


@pytest.mark.parametrize("name", NEW)
def test_accelerator_path_reads_no_value_back(name, monkeypatch):
    """As on CUDA (CPU shortcuts off): no .item(), no bool(tensor)."""
    monkeypatch.setattr(solvers, "_host_visible", lambda t: False)
    G = gram(make_jacobian("conflicting", 4))
    agg = AGGREGATORS[name]()
    with NoHostRead():
        for _ in range(2):
            agg.weights(G, torch.Generator().manual_seed(0))
