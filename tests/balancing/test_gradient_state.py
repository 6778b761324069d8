"""DB-MTL, MoCo, ExcessMTL and GradDrop (``mtvision.balancing.gradient_state``) against independent
references.

Each reference below is the method's step written literally as LibMTL's ``weighting/DB_MTL.py``,
``MoCo.py``, ``ExcessMTL.py`` and ``GradDrop.py`` do it, on one flattened float64 Jacobian ``J [T,P]``
(LibMTL's ``grads``), with its own state carried across steps. The methods get the same gradients as a
list of per-parameter ``[T, ...]`` chunks of several shapes, and their concatenated output must match
the reference step after step. Nothing is compared with the code's own output except where the claim
is "the same" (a restored state, the same random state).
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

import mtvision.balancing.gradient_state  # noqa: F401  (registers the config names)
from mtvision.balancing import build_balancer
from mtvision.balancing.gradient_state import DBMTL, ExcessMTL, GradDrop, MoCo
from mtvision.balancing.gradient_step import GradientBalancer
from mtvision.balancing.step import Forward
from mtvision.ops import reference

SHAPES = ((3, 4), (5,), (2, 2, 2))  # the chunks J is split into
P = sum(torch.Size(s).numel() for s in SHAPES)
KINDS = ("random", "identical", "zero", "opposed", "scaled")
SIZES = (2, 3, 5, 10)
STEPS = 4


# ----------------------------------------------------------------------------------------------
# gradients


def jacobian(kind: str, T: int, gen: torch.Generator, p: int = P) -> torch.Tensor:
    """[T,p] float64 task gradients of a given structure (fresh draws from ``gen``)."""
    J = torch.randn(T, p, generator=gen, dtype=torch.float64)
    if kind == "identical":
        J = J[:1].expand(T, p).clone()
    elif kind == "zero":
        J[T // 2] = 0.0
    elif kind == "opposed":  # every other task is minus a multiple of the previous one
        for i in range(1, T, 2):
            J[i] = -(0.5 + i) * J[i - 1]
    elif kind == "scaled":  # norms from 1e-4 to 1e4
        J = J * torch.logspace(-4, 4, T, dtype=torch.float64)[:, None]
    return J


def split(J: torch.Tensor, shapes=SHAPES) -> list[torch.Tensor]:
    """J [T,P] as fresh per-parameter chunks [T, *shape] (copies: a method may write into them)."""
    T, chunks, at = J.shape[0], [], 0
    for s in shapes:
        n = torch.Size(s).numel()
        chunks.append(J[:, at:at + n].reshape(T, *s).clone())
        at += n
    assert at == J.shape[1]
    return chunks


def flat(chunks) -> torch.Tensor:
    return torch.cat([c.reshape(-1) for c in chunks])


def losses_for(T: int, gen: torch.Generator) -> torch.Tensor:
    return 0.1 + 3.0 * torch.rand(T, generator=gen, dtype=torch.float64)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, scale: float | None = None,
                   rtol: float = 1e-10) -> None:
    """Equal to ``rtol`` relative, and ``rtol`` relative to ``scale`` in absolute terms: the largest
    ``Σ_t |w_t g_t|`` of a coordinate, where opposed terms cancel (default: the largest |expected|)."""
    assert torch.isfinite(actual).all(), actual
    assert torch.isfinite(expected).all(), expected
    scale = expected.abs().max().item() if scale is None else max(scale, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def term_scale(weights: torch.Tensor, rows: torch.Tensor) -> float:
    """The largest ``Σ_t |w_t g_t|`` over the coordinates of rows [T,P]."""
    return (weights.abs() @ rows.abs()).max().item()


# ----------------------------------------------------------------------------------------------
# references: LibMTL's steps, literally, on J [T,P]


class RefDBMTL:
    """LibMTL DB_MTL.backward on the gradients of log(L + 1e-8)."""

    def __init__(self, T, p=P, beta=0.9, beta_sigma=0.0):
        self.step, self.beta, self.beta_sigma, self.task_num = 0, beta, beta_sigma, T
        self.grad_buffer = torch.zeros(T, p, dtype=torch.float64)

    def __call__(self, batch_grads, losses=None):
        self.step += 1
        beta, beta_sigma = self.beta, self.beta_sigma
        self.grad_buffer = batch_grads + (beta / self.step**beta_sigma) * (self.grad_buffer - batch_grads)
        u_grad = self.grad_buffer.norm(dim=-1)
        alpha = u_grad.max() / (u_grad + 1e-8)
        self.scale = term_scale(alpha, self.grad_buffer)
        return sum([alpha[i] * self.grad_buffer[i] for i in range(self.task_num)])


class RefMoCo:
    """LibMTL MoCo.backward."""

    def __init__(self, T, p=P, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0):
        self.step, self.task_num = 0, T
        self.beta, self.beta_sigma, self.gamma, self.gamma_sigma, self.rho = (beta, beta_sigma, gamma,
                                                                              gamma_sigma, rho)
        self.y = torch.zeros(T, p, dtype=torch.float64)
        self.lambd = torch.ones([T], dtype=torch.float64) / T

    def __call__(self, grads, losses):
        self.step += 1
        grads = grads.clone()
        for tn in range(self.task_num):
            grads[tn] = grads[tn] / (grads[tn].norm() + 1e-8) * losses[tn]
        self.y = self.y - (self.beta / self.step**self.beta_sigma) * (self.y - grads)
        eye = torch.eye(self.task_num, dtype=torch.float64)
        self.lambd = F.softmax(self.lambd - (self.gamma / self.step**self.gamma_sigma)
                               * (self.y @ self.y.t() + self.rho * eye) @ self.lambd, -1)
        self.scale = term_scale(self.lambd, self.y)
        return self.y.t() @ self.lambd


class RefExcessMTL:
    """LibMTL ExcessMTL.backward; the shared gradient of ``Σ_t loss_weight_t L_t`` is ``Σ_t w_t g_t``.
    One documented deviation: a task whose first-step estimate is 0 gets ratio 0 (LibMTL divides by 0)."""

    def __init__(self, T, p=P, robust_step_size=1e-2):
        self.task_num, self.robust_step_size = T, robust_step_size
        self.loss_weight = torch.tensor([1.0] * T, dtype=torch.float64)
        self.grad_sum = None
        self.first_epoch = True

    def __call__(self, grads, losses=None):
        if self.grad_sum is None:
            self.grad_sum = torch.zeros_like(grads)
        w = torch.zeros(self.task_num, dtype=torch.float64)
        for i in range(self.task_num):
            self.grad_sum[i] += grads[i] ** 2
            grad_i = grads[i]
            h_i = torch.sqrt(self.grad_sum[i] + 1e-7)
            w[i] = grad_i * (1 / h_i) @ grad_i.t()
        if self.first_epoch:
            self.initial_w = w
            self.first_epoch = False
        else:
            w = torch.where(self.initial_w > 0, w / self.initial_w, 0.0)  # LibMTL: w / self.initial_w
            self.loss_weight = self.loss_weight * torch.exp(w * self.robust_step_size)
            self.loss_weight = self.loss_weight / self.loss_weight.sum() * self.task_num
        self.scale = term_scale(self.loss_weight, grads)
        return self.loss_weight @ grads


def graddrop_draws(gen: torch.Generator, shapes) -> torch.Tensor:
    """U of the feature level as the code draws it: one float32 ``torch.rand`` over all levels'
    coordinates on the host generator, level after level (row-major), flattened."""
    n = sum(torch.Size(s).numel() for s in shapes)
    return torch.rand(n, generator=gen, dtype=torch.float32)


def graddrop_param_draws(gen: torch.Generator, shapes) -> torch.Tensor:
    """U of the parameter level: a seed drawn from the host generator, then the counter-based uniforms of
    ``mtvision.ops.sign_dropout_sum`` over all chunks' coordinates in order (``reference.counter_uniform``,
    an independent NumPy implementation)."""
    seed = int(torch.randint(0, 2**62, (), generator=gen))
    return reference.counter_uniform(seed, sum(torch.Size(s).numel() for s in shapes))


def purity(g: torch.Tensor) -> torch.Tensor:
    """The sign purity ½(1 + Σg/Σ|g|) per coordinate, ½ where every g is 0."""
    mass = g.abs().sum(0)
    return torch.where(mass > 0, 0.5 * (1 + g.sum(0) / mass.where(mass > 0, torch.ones_like(mass))), 0.5)


def ref_graddrop_params(J: torch.Tensor, U: torch.Tensor, leak: float) -> torch.Tensor:
    """LibMTL's GradDrop formula with the coordinates of the shared parameters (no batch, no sign); the
    purity without LibMTL's 1e-7 (the documented choice: all-zero coordinates get 1/2)."""
    T = J.shape[0]
    P_ = purity(J)
    M = P_.gt(U).unsqueeze(0).repeat_interleave(T, dim=0) * J.gt(0) + \
        P_.lt(U).unsqueeze(0).repeat_interleave(T, dim=0) * J.lt(0)
    return (J * (leak + (1 - leak) * M.to(J.dtype))).sum(0)  # M in J's dtype: leak not rounded to float32


def ref_graddrop_features(per_grads: torch.Tensor, rep: torch.Tensor, U: torch.Tensor, leak: float):
    """LibMTL GradDrop.backward: ``per_grads`` [T,B,...] (the features' gradients), ``rep`` [B,...]
    (the features), ``U`` as ``torch.rand_like(P)``; returns what it back-propagates into ``rep``."""
    T = per_grads.shape[0]
    inputs = rep.unsqueeze(0).repeat_interleave(T, dim=0)
    grads = (per_grads * inputs.sign()).sum(1)
    P_ = purity(grads)
    M = P_.gt(U).unsqueeze(0).repeat_interleave(T, dim=0) * grads.gt(0) + \
        P_.lt(U).unsqueeze(0).repeat_interleave(T, dim=0) * grads.lt(0)
    M = M.unsqueeze(1).repeat_interleave(per_grads.size()[1], dim=1)
    transformed_grad = per_grads * (leak + (1 - leak) * M.to(per_grads.dtype))
    return transformed_grad.sum(0)


STATEFUL = {
    "dbmtl": (DBMTL, RefDBMTL),
    "moco": (MoCo, RefMoCo),
    "excessmtl": (ExcessMTL, RefExcessMTL),
}
HYPER = {  # non-default settings, to see every hyperparameter used
    "dbmtl": {"beta": 0.7, "beta_sigma": 0.5},
    "moco": {"beta": 0.3, "beta_sigma": 0.2, "gamma": 0.5, "gamma_sigma": 0.3, "rho": 0.05},
    "excessmtl": {"robust_step_size": 0.3},
}


# ----------------------------------------------------------------------------------------------
# the stateful methods, step after step


@pytest.mark.parametrize("T", SIZES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_stateful_methods_match_libmtl_over_steps(name, kind, T):
    cls, ref_cls = STATEFUL[name]
    method, ref = cls(), ref_cls(T)
    gen = torch.Generator().manual_seed(1000 * T + KINDS.index(kind))
    for _ in range(STEPS):
        J, losses = jacobian(kind, T, gen), losses_for(T, gen)
        out = method.aggregate(split(J), losses=losses)
        assert [o.shape for o in out] == [torch.Size(s) for s in SHAPES]
        assert all(o.dtype == torch.float64 for o in out)
        assert_matches(flat(out), ref(J, losses), ref.scale)


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_stateful_methods_hyperparameters(name):
    cls, ref_cls = STATEFUL[name]
    T = 4
    method, ref = cls(**HYPER[name]), ref_cls(T, **HYPER[name])
    gen = torch.Generator().manual_seed(5)
    for step in range(5):
        J, losses = jacobian("random", T, gen), losses_for(T, gen)
        assert_matches(flat(method.aggregate(split(J), losses=losses)), ref(J, losses), ref.scale)
    assert method.step == 5


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_stateful_methods_on_a_flat_jacobian(name):
    """A [T,P] tensor is one chunk: [P] comes back, the same as the reference."""
    cls, ref_cls = STATEFUL[name]
    method, ref = cls(), ref_cls(3)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        J, losses = jacobian("random", 3, gen), losses_for(3, gen)
        out = method.aggregate(J.clone(), losses=losses)
        assert out.shape == (P,)
        assert_matches(out, ref(J, losses), ref.scale)


def test_dbmtl_gradients_of_log_losses_and_first_step():
    """``task_losses(L, mean)`` is ``L / (mean + 1e-8)``: at ``mean = L`` its gradient is that of
    ``log(L + 1e-8)`` (taken at the process mean under DDP)."""
    x = torch.tensor([0.5, 2.0, 1e-3], dtype=torch.float64, requires_grad=True)
    L = x**2 + 0.1 * x  # any graph
    objective = DBMTL().task_losses(L, L.detach())
    assert objective.shape == (3,)
    for t in range(3):
        got, = torch.autograd.grad(objective[t], x, retain_graph=True)
        want, = torch.autograd.grad(torch.log(L[t] + 1e-8), x, retain_graph=True)
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    # first step: ĝ = (1 - β) g, each rescaled to the largest norm
    J = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    out = DBMTL(beta=0.9).aggregate([J.clone()])[0]
    e = 0.1 * J  # norms 0.5 and 0.1
    expected = (0.5 / (0.5 + 1e-8)) * e[0] + (0.5 / (0.1 + 1e-8)) * e[1]
    assert_matches(out, expected)


def test_moco_normalises_the_gradients_by_the_loss():
    """First step, one task: y = β (L g/|g|), λ = softmax of one number = 1."""
    J = torch.tensor([[3.0, 0.0, 4.0]], dtype=torch.float64)
    out = MoCo(beta=0.5).aggregate([J.clone()], losses=torch.tensor([2.0], dtype=torch.float64))[0]
    assert_matches(out, 0.5 * 2.0 * J[0] / (5.0 + 1e-8))


def test_moco_needs_the_losses():
    with pytest.raises(ValueError, match="losses"):
        MoCo().aggregate([torch.randn(2, 3, dtype=torch.float64)])


def test_excessmtl_first_step_weights_are_one_and_weights_sum_to_T():
    T = 4
    method, ref = ExcessMTL(robust_step_size=0.5), RefExcessMTL(T, robust_step_size=0.5)
    gen = torch.Generator().manual_seed(3)
    J = jacobian("scaled", T, gen)
    assert_matches(flat(method.aggregate(split(J))), J.sum(0))
    ref(J)
    for _ in range(3):
        J = jacobian("scaled", T, gen)
        assert_matches(flat(method.aggregate(split(J))), ref(J), ref.scale)
        torch.testing.assert_close(method.loss_weights, ref.loss_weight, rtol=1e-12, atol=0)
        torch.testing.assert_close(method.loss_weights.sum(), torch.tensor(float(T), dtype=torch.float64))
    with pytest.raises(TypeError):
        method.weights(J @ J.T)


def test_excessmtl_zero_initial_estimate_gives_ratio_zero():
    """A task with a zero gradient at the first step has e⁰ = 0: LibMTL's ``w / initial_w`` is then inf
    (or nan); the documented choice is ratio 0, i.e. that task's weight only moves by the renormalisation."""
    T, rs = 3, 0.2
    gen = torch.Generator().manual_seed(4)
    J0 = jacobian("random", T, gen)
    J0[1] = 0.0
    method = ExcessMTL(robust_step_size=rs)
    method.aggregate(split(J0))
    assert method.initial[1] == 0 and (method.initial[[0, 2]] > 0).all()
    weights = torch.ones(T, dtype=torch.float64)
    grad_sum = J0**2
    for step in range(3):
        J = jacobian("random", T, gen)
        if step == 1:
            J[1] = 0.0  # 0 / 0 in LibMTL
        out = flat(method.aggregate(split(J)))
        grad_sum = grad_sum + J**2
        e = (J * J / torch.sqrt(grad_sum + 1e-7)).sum(1)
        literal = e / (J0 * J0 / torch.sqrt(J0**2 + 1e-7)).sum(1)
        assert not torch.isfinite(literal[1])  # what LibMTL would compute
        ratio = torch.tensor([literal[0], 0.0, literal[2]], dtype=torch.float64)
        weights = weights * torch.exp(rs * ratio)
        weights = weights / weights.sum() * T
        torch.testing.assert_close(method.loss_weights, weights, rtol=1e-12, atol=0)
        assert_matches(out, weights @ J, term_scale(weights, J))


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_stateful_methods_mixed_degenerate_steps(name):
    """The structure changes from step to step (a zero gradient, then identical, opposed, scaled)."""
    cls, ref_cls = STATEFUL[name]
    T = 5
    method, ref = cls(), ref_cls(T)
    gen = torch.Generator().manual_seed(6)
    for kind in ("random", "zero", "identical", "opposed", "scaled"):
        J, losses = jacobian(kind, T, gen), losses_for(T, gen)
        assert_matches(flat(method.aggregate(split(J), losses=losses)), ref(J, losses), ref.scale)


# ----------------------------------------------------------------------------------------------
# state


def _state_is_plain(value) -> bool:
    if isinstance(value, (int, float, bool, str)) or value is None:
        return True
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return all(_state_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _state_is_plain(v) for k, v in value.items())
    return False


def _through_bytes(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, x in a.items():
        y = b[k]
        if isinstance(x, list):
            assert len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y))
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            assert x == y


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_state_dict_resumes_identically(name, k):
    cls, _ = STATEFUL[name]
    T = 3
    original = cls(**HYPER[name])
    gen = torch.Generator().manual_seed(7)
    for _ in range(k):
        original.aggregate(split(jacobian("random", T, gen)), losses=losses_for(T, gen))
    state = original.state_dict()
    assert _state_is_plain(state) and state["step"] == k
    snapshot = {n: ([t.clone() for t in v] if isinstance(v, list) else v.clone() if torch.is_tensor(v) else v)
                for n, v in state.items()}
    resumed = cls(**HYPER[name])
    resumed.load_state_dict(_through_bytes(state))
    in_memory = cls(**HYPER[name])
    in_memory.load_state_dict(state)  # the dict itself, not a copy
    for _ in range(3):
        J, losses = jacobian("random", T, gen), losses_for(T, gen)
        expected = flat(original.aggregate(split(J), losses=losses))
        assert torch.equal(flat(resumed.aggregate(split(J), losses=losses)), expected)
        assert torch.equal(flat(in_memory.aggregate(split(J), losses=losses)), expected)
    _assert_states_equal(resumed.state_dict(), original.state_dict())
    _assert_states_equal(state, snapshot)  # loading did not tie the saved dict to the running state


def test_state_dict_entries():
    gen = torch.Generator().manual_seed(8)
    J, losses = jacobian("random", 3, gen), losses_for(3, gen)
    expected = {"dbmtl": {"step", "ema"}, "moco": {"step", "tracked", "lambd"},
                "excessmtl": {"step", "accumulator", "initial", "loss_weights"}}
    for name, (cls, _) in STATEFUL.items():
        method = cls()
        assert method.state_dict() == {"step": 0}
        method.aggregate(split(J), losses=losses)
        state = method.state_dict()
        assert set(state) == expected[name]
        for key in ("ema", "tracked", "accumulator"):
            if key in state:
                assert [t.shape for t in state[key]] == [torch.Size((3, *s)) for s in SHAPES]
        _assert_states_equal(_through_bytes(state), state)
    assert GradDrop().state_dict() == {}


def test_restored_state_of_other_shapes_is_refused():
    method = DBMTL()
    method.aggregate(split(torch.randn(3, P, dtype=torch.float64)))
    fresh = DBMTL()
    fresh.load_state_dict(method.state_dict())
    with pytest.raises(ValueError, match="does not match"):
        fresh.aggregate([torch.randn(3, 7, dtype=torch.float64)])


# ----------------------------------------------------------------------------------------------
# GradDrop


@pytest.mark.parametrize("leak", [0.0, 0.3])
@pytest.mark.parametrize("T", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_graddrop_param_level_matches_libmtl(kind, T, leak):
    method = GradDrop(leak=leak)
    gen = torch.Generator().manual_seed(100 + T)
    ref_gen = torch.Generator().manual_seed(100 + T)
    data = torch.Generator().manual_seed(T + 10 * KINDS.index(kind))
    for _ in range(STEPS):  # the generator advances: fresh masks every step
        J = jacobian(kind, T, data)
        out = method.aggregate(split(J), gen)
        U = graddrop_param_draws(ref_gen, SHAPES)
        assert_matches(flat(out), ref_graddrop_params(J, U, leak), term_scale(torch.ones(T, dtype=torch.float64), J))
    assert torch.equal(gen.get_state(), ref_gen.get_state())  # one seed a step, no more


def _features(B, T, shapes, gen):
    """Per level: rows [T,B,*s] (feature gradients), features [B,*s] (ReLU-like: some exact zeros)."""
    rows = [torch.randn(T, B, *s, generator=gen, dtype=torch.float64) for s in shapes]
    feats = [torch.randn(B, *s, generator=gen, dtype=torch.float64).clamp_min(-0.5) for s in shapes]
    feats = [torch.where(f < 0, torch.zeros_like(f), f) if i % 2 else f for i, f in enumerate(feats)]
    return rows, feats


FEATURE_SHAPES = ((3, 4, 5), (2, 2, 3))  # [C,H,W] of two feature levels


@pytest.mark.parametrize("leak", [0.0, 0.3])
@pytest.mark.parametrize("T", (2, 3, 5))
def test_graddrop_feature_level_matches_libmtl(T, leak):
    method, B = GradDrop(leak=leak), 4
    gen, ref_gen = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    data = torch.Generator().manual_seed(T)
    for _ in range(3):
        rows, feats = _features(B, T, FEATURE_SHAPES, data)
        out = [f.new_empty(f.shape) for f in feats]
        method.combine([r.clone() for r in rows], torch.ones(T, dtype=torch.float64), out, gen, inputs=feats)
        U = graddrop_draws(ref_gen, FEATURE_SHAPES)
        at = 0
        for r, f, o, s in zip(rows, feats, out, FEATURE_SHAPES):
            n = torch.Size(s).numel()
            expected = ref_graddrop_features(r, f, U[at:at + n].view(s), leak)
            at += n
            assert o.dtype == torch.float64
            assert_matches(o, expected, r.abs().sum((0, 1)).max().item())


def test_graddrop_feature_level_sign_of_features_matters():
    """The purity is of the gradient times the sign of the feature. Gradients (1, -3) on a feature
    x > 0: signed (1, -3), P = 1/4, task 0's 1 is kept if U < 1/4, else task 1's -3. On x < 0: signed
    (-1, 3), P = 3/4, task 1's -3 is kept if U < 3/4, else task 0's 1. A zero feature: nothing passes."""
    T, B = 2, 1
    rows = torch.tensor([1.0, -3.0], dtype=torch.float64).view(T, B, 1, 1, 1)
    seen = set()
    for x, purity, below, above in ((1.0, 0.25, 1.0, -3.0), (-1.0, 0.75, -3.0, 1.0)):
        feats = torch.full((B, 1, 1, 1), x, dtype=torch.float64)
        for seed in range(8):
            U = torch.rand(1, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).item()
            out = [torch.empty(B, 1, 1, 1, dtype=torch.float64)]
            GradDrop().combine([rows.clone()], None, out, torch.Generator().manual_seed(seed), inputs=[feats])
            assert out[0].item() == (below if U < purity else above)
            seen.add((x, out[0].item()))
    assert len(seen) == 4  # the draws above reach both outcomes for both signs
    out = [torch.empty(B, 1, 1, 1, dtype=torch.float64)]
    GradDrop().combine([rows.clone()], None, out, torch.Generator().manual_seed(0),
                       inputs=[torch.zeros(B, 1, 1, 1, dtype=torch.float64)])
    assert out[0].item() == 0.0


def test_graddrop_leak_one_is_the_plain_sum():
    gen = torch.Generator().manual_seed(11)
    J = jacobian("opposed", 4, gen)
    out = flat(GradDrop(leak=1.0).aggregate(split(J), torch.Generator().manual_seed(0)))
    assert_matches(out, J.sum(0), term_scale(torch.ones(4, dtype=torch.float64), J))
    rows, feats = _features(3, 4, FEATURE_SHAPES, gen)
    out = [f.new_empty(f.shape) for f in feats]
    GradDrop(leak=1.0).combine(rows, None, out, torch.Generator().manual_seed(0), inputs=feats)
    for o, r in zip(out, rows):
        assert_matches(o, r.sum(0), r.abs().sum(0).max().item())


def test_graddrop_keeps_everything_when_signs_agree():
    """All task gradients of one sign at a coordinate: P = 1 (or 0), and every value is kept, whatever U."""
    gen = torch.Generator().manual_seed(12)
    T = 5
    sign = torch.where(torch.rand(P, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    for s in (torch.ones(P, dtype=torch.float64), -torch.ones(P, dtype=torch.float64), sign):
        J = (1.0 + torch.rand(T, P, generator=gen, dtype=torch.float64)) * s
        for seed in range(3):
            out = flat(GradDrop().aggregate(split(J), torch.Generator().manual_seed(seed)))
            assert_matches(out, J.sum(0))
    # feature level: gradients times the feature's sign agree across tasks and samples
    B = 3
    fsign = torch.where(torch.rand(B, 2, 3, 3, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    csign = torch.where(torch.rand(2, 3, 3, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    feats = fsign * (0.1 + torch.rand(B, 2, 3, 3, generator=gen, dtype=torch.float64))
    rows = (1.0 + torch.rand(T, B, 2, 3, 3, generator=gen, dtype=torch.float64)) * fsign * csign
    out = [torch.empty(B, 2, 3, 3, dtype=torch.float64)]
    GradDrop().combine([rows], None, out, torch.Generator().manual_seed(0), inputs=[feats])
    assert_matches(out[0], rows.sum(0))


def test_graddrop_same_generator_state_same_output():
    gen = torch.Generator().manual_seed(13)
    J = jacobian("opposed", 6, gen)
    g = torch.Generator().manual_seed(21)
    state = g.get_state()
    a = flat(GradDrop().aggregate(split(J), g))
    g.set_state(state)
    b = flat(GradDrop().aggregate(split(J), g))
    c = flat(GradDrop().aggregate(split(J), torch.Generator().manual_seed(21)))
    assert torch.equal(a, b) and torch.equal(a, c)
    d = flat(GradDrop().aggregate(split(J), g))  # the generator moved on: other masks
    assert not torch.equal(a, d)
    rows, feats = _features(2, 6, FEATURE_SHAPES, gen)
    outs = []
    for _ in range(2):
        out = [f.new_empty(f.shape) for f in feats]
        GradDrop().combine(rows, None, out, torch.Generator().manual_seed(3), inputs=feats)
        outs.append(out)
    assert all(torch.equal(x, y) for x, y in zip(*outs))


def test_graddrop_attributes_and_weights():
    m = GradDrop()
    assert m.linear is False and m.stochastic is True and m.leak == 0.0
    assert set(m.levels) == {"param", "rep"}
    G = torch.eye(3, dtype=torch.float64)
    assert torch.equal(m.weights(G), torch.ones(3, dtype=torch.float64))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            GradDrop(leak=bad)


# ----------------------------------------------------------------------------------------------
# attributes and registration


def test_attributes_and_config_names():
    for cls in (DBMTL, MoCo, ExcessMTL):
        assert cls.levels == ("param",)
        assert cls.linear is True and cls.stochastic is False
    assert ExcessMTL.weights_task_params is True
    assert DBMTL.weights_task_params is False and MoCo.weights_task_params is False
    assert GradDrop.weights_task_params is False
    L = torch.tensor([1.0, 2.0], dtype=torch.float64)
    for cls in (MoCo, ExcessMTL, GradDrop):
        assert torch.equal(cls().task_losses(L, L), L)
    for name, cls in (("dbmtl", DBMTL), ("moco", MoCo), ("excessmtl", ExcessMTL), ("graddrop", GradDrop)):
        assert type(build_balancer(name, 3)) is cls
    assert build_balancer("dbmtl", 3, beta=0.5, beta_sigma=0.1).beta_sigma == 0.1
    assert build_balancer("moco", 3, rho=0.2).rho == 0.2
    assert build_balancer("excessmtl", 3, robust_step_size=0.5).robust_step_size == 0.5
    assert build_balancer("graddrop", 3, leak=0.25).leak == 0.25
    with pytest.raises(ValueError):
        DBMTL(beta=1.5)


def test_methods_with_per_task_state_refuse_the_representation_level():
    shared = [torch.nn.Parameter(torch.zeros(2))]
    heads = [[torch.nn.Parameter(torch.zeros(2))], [torch.nn.Parameter(torch.zeros(2))]]
    for cls in (DBMTL, MoCo, ExcessMTL):
        with pytest.raises(ValueError, match="param"):
            GradientBalancer(cls(), shared, heads, level="rep")
    GradientBalancer(GradDrop(), shared, heads, level="rep")


# ----------------------------------------------------------------------------------------------
# end to end through the training step


class TinyModel(torch.nn.Module):
    def __init__(self, T: int, gen: torch.Generator):
        super().__init__()
        self.trunk = torch.nn.Linear(4, 6, dtype=torch.float64)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(6, 2, dtype=torch.float64) for _ in range(T))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return [head(h) for head in self.heads]


def _batch(T, gen):
    x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    ys = [torch.randn(8, 2, generator=gen, dtype=torch.float64) for _ in range(T)]
    return x, ys


@pytest.mark.parametrize("via", ["combine", "backward"])
@pytest.mark.parametrize("name", ["dbmtl", "moco", "excessmtl", "graddrop"])
def test_gradient_balancer_end_to_end(name, via):
    """``combine`` given the method's objective, or ``backward`` (which takes ``task_losses`` itself)."""
    T = 3
    gen = torch.Generator().manual_seed(14)
    model = TinyModel(T, gen)
    shared = list(model.trunk.parameters())
    heads = [list(h.parameters()) for h in model.heads]
    method = {"dbmtl": DBMTL, "moco": MoCo, "excessmtl": ExcessMTL, "graddrop": GradDrop}[name]()
    balancer = GradientBalancer(method, shared, heads, level="param", generator=torch.Generator().manual_seed(0))
    ref = {"dbmtl": RefDBMTL, "moco": RefMoCo, "excessmtl": RefExcessMTL}.get(name, lambda T, p: None)(
        T, sum(p.numel() for p in shared))
    draws = torch.Generator().manual_seed(0)  # the step's host generator (GradDrop's weights draw nothing)
    for _ in range(3):
        x, ys = _batch(T, gen)
        outputs = model(x)
        losses = torch.stack([((o - y) ** 2).mean() for o, y in zip(outputs, ys)])
        objective = torch.log(losses + 1e-8) if name == "dbmtl" else losses
        J = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(objective[t], shared,
                                                                                retain_graph=True)])
                         for t in range(T)])
        head_grads = [torch.autograd.grad(objective[t], heads[t], retain_graph=True) for t in range(T)]
        if name == "graddrop":
            expected = ref_graddrop_params(J, graddrop_param_draws(draws, [p.shape for p in shared]), 0.0)
            scale = term_scale(torch.ones(T, dtype=torch.float64), J)
        else:
            expected = ref(J, losses.detach())
            scale = ref.scale
        if name == "excessmtl":
            head_grads = [[g * ref.loss_weight[t] for g in gs] for t, gs in enumerate(head_grads)]
        model.zero_grad(set_to_none=True)
        if via == "combine":
            balancer.combine(method.task_losses(losses, losses.detach()), outputs, mean_losses=losses.detach())
        else:
            result = balancer.backward(losses, losses.detach(), Forward(dict(zip(balancer.tasks, outputs))))
            assert not result.skip
        # the step hands the weights to the combination in float32 (GradientCombination.weights), so the
        # float64 model's shared gradients carry float32 relative precision; GradDrop takes no weights
        rtol = 1e-10 if name == "graddrop" else 1e-6
        assert_matches(torch.cat([p.grad.reshape(-1) for p in shared]), expected, scale, rtol=rtol)
        for t in range(T):
            for p, g in zip(heads[t], head_grads[t]):
                assert_matches(p.grad, g)


@pytest.mark.parametrize("scale", [1e-9, 1.0, 2.0**16])
def test_graddrop_purity_does_not_depend_on_the_gradients_scale(scale):
    """Scaling every gradient (fp16's loss scale) scales the result and keeps the same coordinates: tiny
    gradients of one sign are all kept (LibMTL's +1e-7 in the purity would drop about half of them)."""
    gen = torch.Generator().manual_seed(5)
    J = torch.randn(4, P, generator=gen, dtype=torch.float64)
    ref = flat(GradDrop().aggregate(split(J), torch.Generator().manual_seed(1)))
    out = flat(GradDrop().aggregate(split(J * scale), torch.Generator().manual_seed(1)))
    assert_matches(out / scale, ref, J.abs().sum(0).max().item())
    same_sign = J.abs() * scale
    kept = flat(GradDrop().aggregate(split(same_sign), torch.Generator().manual_seed(1)))
    assert torch.equal(kept, same_sign.sum(0))
