"""GLS and STCH (mtvision.balancing.scalarization) against their objectives written out directly.

The references below are the objectives as the papers / the authors' code state them (GLS:
``torch.pow(L.prod(), 1/T)``; STCH: ``sum log(L + 1e-20)`` during warm-up, then
``mu * T * log sum exp((log(L / z + 1e-20) - max) / mu)``), differentiated by autograd; the classes only
give weights, so ``sum_t w_t L_t`` must reproduce those gradients.
"""

import io
import math

import pytest
import torch
from torch import nn

from mtvision.balancing import BALANCERS, LOSS_WEIGHTINGS, build_balancer
from mtvision.balancing.scalarization import GLS, STCH

DELTA = 1e-20


# ----------------------------------------------------------------------------------------------------
# References (written independently of the module)

def gls_reference(losses):
    return torch.pow(losses.prod(), 1.0 / losses.numel())


def stch_warmup_reference(losses):
    return torch.log(losses + DELTA).sum()


def stch_reference(losses, nadir, mu):
    u = torch.log(losses / nadir + DELTA)
    u = u - u.detach().max()
    return mu * losses.numel() * torch.logsumexp(u / mu, dim=0)


class AuthorsSTCH:
    """The authors' STCH loop (Xi-L/STCH, ``STCH_MTL/LibMTL/weighting/STCH.py``) restated: ``epoch`` is
    set by the trainer (0, 1, ...), the nadir epoch's losses are averaged at every step, the nadir is fixed
    at the first step after it. ``loss(L)`` returns the objective of the step (differentiable)."""

    def __init__(self, mu, warmup_epoch):
        self.mu, self.warmup_epoch = mu, warmup_epoch
        self.epoch, self.total, self.count, self.nadir = 0, 0.0, 0, None

    def loss(self, losses):
        if self.epoch < self.warmup_epoch:
            return stch_warmup_reference(losses)
        if self.epoch == self.warmup_epoch:
            self.total = self.total + losses.detach()
            self.count += 1
            return stch_warmup_reference(losses)
        if self.nadir is None:
            self.nadir = self.total / self.count
        return stch_reference(losses, self.nadir, self.mu)


def grad_wrt_losses(objective, losses):
    leaf = losses.detach().clone().double().requires_grad_(True)
    (g,) = torch.autograd.grad(objective(leaf), leaf)
    return g


# ----------------------------------------------------------------------------------------------------
# A tiny float64 model with T regression heads on a shared layer; task t's loss is scaled by scales[t].

class Tiny(nn.Module):
    def __init__(self, num_tasks, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.shared = nn.Linear(4, 6).double()
        self.heads = nn.ModuleList([nn.Linear(6, 1).double() for _ in range(num_tasks)])
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(16, 4, generator=g, dtype=torch.float64)
        self.y = torch.randn(16, num_tasks, generator=g, dtype=torch.float64)

    def losses(self, scales):
        h = torch.tanh(self.shared(self.x))
        return torch.stack([((head(h)[:, 0] - self.y[:, t]) ** 2).mean() * scales[t]
                            for t, head in enumerate(self.heads)])


def param_grads(model, total):
    grads = torch.autograd.grad(total, list(model.parameters()), allow_unused=True)
    return torch.cat([g.reshape(-1) for g in grads])


def assert_same_step(model, scales, bal, reference):
    """The parameter gradient of ``sum(w.detach() * L)`` equals the gradient of ``reference(L)``."""
    losses = model.losses(scales)
    w = bal.weights(losses.detach())
    assert w.dtype == torch.float32 and not w.requires_grad and w.shape == losses.shape
    mine = param_grads(model, (w.detach().double() * losses).sum())
    ref = param_grads(model, reference(model.losses(scales)))
    assert torch.isfinite(ref).all()
    scale = ref.abs().max()
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6 * float(scale))
    return losses.detach()


def spread_scales(num_tasks):
    """Per-task scales from 1e-6 to 1e6 (losses twelve orders of magnitude apart)."""
    return torch.logspace(-6, 6, num_tasks, dtype=torch.float64)


def run_epochs(bal, epochs, steps=3, num_tasks=3, seed=0):
    """Feeds ``epochs`` x ``steps`` random losses through weights/update/end_epoch; returns them."""
    g = torch.Generator().manual_seed(seed)
    seen = []
    for _ in range(epochs):
        for _ in range(steps):
            losses = torch.rand(num_tasks, generator=g) * 3 + 0.1
            bal.weights(losses)
            bal.update(losses)
            seen.append(losses)
        bal.end_epoch()
    return seen


# ----------------------------------------------------------------------------------------------------
# Registry

def test_registered_and_built_by_name():
    assert "gls" in BALANCERS and "stch" in BALANCERS
    assert LOSS_WEIGHTINGS["gls"] is GLS and LOSS_WEIGHTINGS["stch"] is STCH
    bal = build_balancer("stch", 3, mu=0.5)
    assert isinstance(bal, STCH) and bal.mu == 0.5 and bal.warmup_epoch == 4 and bal.warmup_iters is None
    assert isinstance(build_balancer("gls", 2), GLS)
    with pytest.raises(ValueError, match="balancer.kwargs"):
        build_balancer("stch", 3, temperature=2.0)


@pytest.mark.parametrize("kw", [{"mu": 0.0}, {"mu": -1.0}, {"mu": float("inf")}, {"warmup_epoch": -1},
                                {"warmup_epoch": 1.5}, {"warmup_iters": -2}, {"nadir_iters": 3},
                                {"warmup_iters": 2, "nadir_iters": 0}])
def test_stch_rejects_bad_arguments(kw):
    with pytest.raises(ValueError, match="STCH"):
        STCH(3, **kw)


def test_gls_rejects_bad_eps():
    with pytest.raises(ValueError, match="GLS"):
        GLS(2, eps=0.0)


# ----------------------------------------------------------------------------------------------------
# GLS

@pytest.mark.parametrize("num_tasks", [2, 3, 5, 10])
def test_gls_gradient_equals_geometric_mean_gradient(num_tasks):
    model = Tiny(num_tasks)
    for scales in (torch.ones(num_tasks, dtype=torch.float64), spread_scales(num_tasks)):
        assert_same_step(model, scales, GLS(num_tasks), gls_reference)


@pytest.mark.parametrize("num_tasks", [2, 4, 10])
def test_gls_weights_are_the_objective_derivative(num_tasks):
    g = torch.Generator().manual_seed(num_tasks)
    losses = torch.exp(torch.empty(num_tasks, dtype=torch.float64).uniform_(-14, 14, generator=g))
    w = GLS(num_tasks).weights(losses)
    ref = grad_wrt_losses(gls_reference, losses)
    torch.testing.assert_close(w.double(), ref, rtol=1e-6, atol=0.0)
    # w_t L_t = F / T for every task
    f = gls_reference(losses)
    torch.testing.assert_close((w.double() * losses), torch.full_like(losses, float(f) / num_tasks), rtol=1e-6,
                               atol=0.0)
    assert GLS(num_tasks).objective(losses).item() == pytest.approx(f.item(), rel=1e-12)


def test_gls_no_overflow_for_large_losses():
    losses = torch.full((10,), 1e6)  # float32: the product 1e60 would overflow, the log form does not
    w = GLS(10).weights(losses)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, torch.full((10,), 0.1))


@pytest.mark.parametrize("num_tasks", [2, 3, 10])
@pytest.mark.parametrize("c", [1e-6, 0.5, 7.0, 1e6])
def test_gls_scaling_one_loss(num_tasks, c):
    # F scales by c^(1/T): the other weights by c^(1/T), the scaled task's by c^(1/T) / c
    g = torch.Generator().manual_seed(1)
    losses = torch.rand(num_tasks, generator=g, dtype=torch.float64) + 0.2
    bal = GLS(num_tasks)
    w = bal.weights(losses).double()
    scaled = losses.clone()
    scaled[0] *= c
    w2 = bal.weights(scaled).double()
    factor = c ** (1.0 / num_tasks)
    expected = w * factor
    expected[0] = w[0] * factor / c
    torch.testing.assert_close(w2, expected, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("num_tasks", [2, 3, 10])
def test_gls_zero_loss_is_finite_and_is_the_smoothed_gradient(num_tasks):
    losses = torch.linspace(0.5, 2.0, num_tasks, dtype=torch.float64)
    losses[0] = 0.0
    # the plain objective's gradient is inf/nan at a zero loss
    plain = grad_wrt_losses(gls_reference, losses)
    assert not torch.isfinite(plain).all()
    bal = GLS(num_tasks)
    w = bal.weights(losses)
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert torch.isfinite((w.double() * losses).sum())
    smoothed = grad_wrt_losses(lambda x: torch.pow((x + 1e-20).prod(), 1.0 / num_tasks), losses)
    torch.testing.assert_close(w.double(), smoothed, rtol=1e-6, atol=0.0)
    # float32 losses, all zero, and negative (treated as 0): still finite
    for bad in (losses.float(), torch.zeros(num_tasks), -torch.ones(num_tasks)):
        assert torch.isfinite(bal.weights(bad)).all()


def test_gls_zero_loss_in_a_model_step():
    model = Tiny(3)
    scales = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    losses = model.losses(scales)
    w = GLS(3).weights(losses.detach())
    grads = param_grads(model, (w.double() * losses).sum())
    assert torch.isfinite(grads).all()


# ----------------------------------------------------------------------------------------------------
# STCH: the step in each phase

@pytest.mark.parametrize("num_tasks", [2, 3, 10])
def test_stch_warmup_gradient(num_tasks):
    model = Tiny(num_tasks)
    bal = STCH(num_tasks)
    assert bal.phase == "warmup"
    for scales in (torch.ones(num_tasks, dtype=torch.float64), spread_scales(num_tasks)):
        assert_same_step(model, scales, bal, stch_warmup_reference)


@pytest.mark.parametrize("num_tasks", [2, 3, 5, 10])
@pytest.mark.parametrize("mu", [0.1, 0.5, 1.0, 4.0])
def test_stch_gradient_after_warmup(num_tasks, mu):
    model = Tiny(num_tasks, seed=num_tasks)
    for scales in (torch.ones(num_tasks, dtype=torch.float64), spread_scales(num_tasks)):
        bal = STCH(num_tasks, mu=mu, warmup_epoch=0)
        with torch.no_grad():  # the nadir: the mean of two steps' losses, slightly off the current ones
            bal.update(model.losses(scales) * 1.3)
            bal.update(model.losses(scales) * 0.9)
        bal.end_epoch()
        assert bal.phase == "stch"
        nadir = bal.nadir.double()
        torch.testing.assert_close(nadir, (model.losses(scales) * 1.1).detach(), rtol=1e-6, atol=0.0)
        assert_same_step(model, scales, bal, lambda losses, z=nadir: stch_reference(losses, z, mu))


@pytest.mark.parametrize("mu", [0.05, 1.0, 3.0])
def test_stch_weights_are_the_objective_derivative(mu):
    g = torch.Generator().manual_seed(5)
    for num_tasks in range(2, 11):
        bal = STCH(num_tasks, mu=mu, warmup_epoch=0)
        nadir = torch.exp(torch.empty(num_tasks).uniform_(-14, 14, generator=g))
        bal.update(nadir)
        bal.end_epoch()
        assert torch.equal(bal.nadir, nadir)
        losses = nadir.double() * torch.exp(torch.empty(num_tasks, dtype=torch.float64).uniform_(-3, 3,
                                                                                                  generator=g))
        w = bal.weights(losses)
        ref = grad_wrt_losses(lambda x, z=nadir: stch_reference(x, z.double(), mu), losses)
        # atol: float32 weights below the normal range (~1e-38) keep fewer digits
        torch.testing.assert_close(w.double(), ref, rtol=1e-5, atol=1e-37)
        # the stated closed form
        u = torch.log(losses / nadir.double() + DELTA)
        closed = num_tasks * torch.softmax(u / mu, 0) * (1 / nadir.double()) / (losses / nadir.double() + DELTA)
        torch.testing.assert_close(w.double(), closed, rtol=1e-6, atol=1e-37)
        objective = bal.objective(losses)
        assert objective.item() == pytest.approx(stch_reference(losses, nadir.double(), mu).item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------------
# STCH: phases over epochs, against the authors' loop

@pytest.mark.parametrize("warmup_epoch", [0, 1, 2, 4])
@pytest.mark.parametrize("mu", [0.3, 1.0])
def test_stch_phases_follow_the_authors_loop(warmup_epoch, mu):
    bal = STCH(3, mu=mu, warmup_epoch=warmup_epoch)
    ref = AuthorsSTCH(mu, warmup_epoch)
    g = torch.Generator().manual_seed(warmup_epoch)
    phases = []
    for epoch in range(warmup_epoch + 3):
        ref.epoch = epoch
        for _ in range(4):
            losses = (torch.rand(3, generator=g, dtype=torch.float64) + 0.05) * torch.tensor([1e-3, 1.0, 50.0],
                                                                                              dtype=torch.float64)
            phases.append(bal.phase)
            w = bal.weights(losses)
            expected = grad_wrt_losses(ref.loss, losses)
            torch.testing.assert_close(w.double(), expected, rtol=1e-5, atol=0.0)
            bal.update(losses)
        bal.end_epoch()
        assert bal.epoch == epoch + 1
    assert phases == ["warmup"] * 4 * warmup_epoch + ["nadir"] * 4 + ["stch"] * 8
    torch.testing.assert_close(bal.nadir.double(), ref.nadir, rtol=1e-6, atol=0.0)


def test_stch_nadir_is_the_mean_of_the_nadir_epoch_only():
    bal = STCH(2, warmup_epoch=2)
    seen = run_epochs(bal, epochs=4, steps=3, num_tasks=2)
    expected = torch.stack(seen[6:9]).double().mean(0).float()
    torch.testing.assert_close(bal.nadir, expected, rtol=1e-7, atol=0.0)
    assert bal.has_nadir and bal.loss_count == 3 and bal.epoch == 4


def test_stch_empty_nadir_epoch_extends_the_window():
    bal = STCH(2, warmup_epoch=1)
    bal.end_epoch()       # epoch 0: warm-up
    bal.end_epoch()       # epoch 1: the nadir epoch, but no step was taken (all skipped)
    assert bal.phase == "nadir" and not bal.has_nadir
    losses = torch.tensor([2.0, 3.0])
    torch.testing.assert_close(bal.weights(losses), 1.0 / losses)
    bal.update(losses)
    bal.end_epoch()
    assert bal.phase == "stch"
    assert torch.equal(bal.nadir, losses)


def test_stch_end_epoch_only_counts():
    bal = STCH(2, warmup_epoch=3)
    losses = torch.tensor([1.0, 2.0])
    for _ in range(3):
        bal.update(losses)
        bal.end_epoch()
    assert bal.loss_count == 0 and bal.phase == "nadir"


# ----------------------------------------------------------------------------------------------------
# STCH: iteration counting (our addition)

@pytest.mark.parametrize("warmup_iters,nadir_iters", [(0, None), (3, None), (3, 2), (1, 4)])
def test_stch_warmup_iters(warmup_iters, nadir_iters):
    bal = STCH(3, mu=0.5, warmup_epoch=100, warmup_iters=warmup_iters, nadir_iters=nadir_iters)
    n = 1 if nadir_iters is None else nadir_iters
    g = torch.Generator().manual_seed(0)
    seen, phases = [], []
    for step in range(warmup_iters + n + 3):
        losses = torch.rand(3, generator=g, dtype=torch.float64) + 0.1
        phases.append(bal.phase)
        w = bal.weights(losses)
        if step < warmup_iters + n:
            torch.testing.assert_close(w.double(), grad_wrt_losses(stch_warmup_reference, losses), rtol=1e-6,
                                       atol=0.0)
        else:
            nadir = torch.stack(seen[warmup_iters:warmup_iters + n]).mean(0)
            ref = grad_wrt_losses(lambda x, z=nadir: stch_reference(x, z, 0.5), losses)
            torch.testing.assert_close(w.double(), ref, rtol=1e-5, atol=0.0)
        bal.update(losses)
        seen.append(losses)
        bal.end_epoch()  # epochs are counted but do not move the phases
    assert phases == ["warmup"] * warmup_iters + ["nadir"] * n + ["stch"] * 3
    assert bal.iteration == warmup_iters + n + 3


# ----------------------------------------------------------------------------------------------------
# STCH: invariance and degenerate losses

@pytest.mark.parametrize("c", [1e-6, 0.25, 3.0, 1e6])
def test_stch_invariant_to_rescaling_a_loss_with_its_nadir(c):
    g = torch.Generator().manual_seed(2)
    nadir = torch.rand(4, generator=g) + 0.5
    losses = torch.rand(4, generator=g, dtype=torch.float64) + 0.2
    a, b = STCH(4, mu=0.7, warmup_epoch=0), STCH(4, mu=0.7, warmup_epoch=0)
    scaled_nadir = nadir.clone()
    scaled_nadir[1] *= c
    a.update(nadir)
    b.update(scaled_nadir)
    a.end_epoch()
    b.end_epoch()
    scaled = losses.clone()
    scaled[1] *= c
    wa, wb = a.weights(losses).double(), b.weights(scaled).double()
    # the same step: w_t L_t contributions agree, so the scaled task's weight is divided by c
    torch.testing.assert_close(wb * scaled, wa * losses, rtol=1e-5, atol=0.0)
    expected = wa.clone()
    expected[1] = wa[1] / c
    torch.testing.assert_close(wb, expected, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("num_tasks", [2, 3, 10])
@pytest.mark.parametrize("mu", [0.01, 1.0, 100.0])
def test_stch_degenerate_losses_stay_finite(num_tasks, mu):
    spread = spread_scales(num_tasks).float()
    cases = []
    for nadir in (torch.ones(num_tasks), spread, torch.zeros(num_tasks), spread * (torch.arange(num_tasks) % 2)):
        for losses in (torch.ones(num_tasks), spread, spread.flip(0), torch.zeros(num_tasks)):
            zero_one = losses.clone()
            zero_one[0] = 0.0
            cases.extend([(nadir, losses), (nadir, zero_one)])
    for nadir, losses in cases:
        bal = STCH(num_tasks, mu=mu, warmup_epoch=0)
        assert torch.isfinite(bal.weights(losses)).all()  # warm-up: 1 / (L + 1e-20)
        bal.update(nadir)
        bal.end_epoch()
        assert torch.isfinite(bal.nadir).all() and (bal.nadir > 0).all()
        for dtype in (torch.float32, torch.float64):
            w = bal.weights(losses.to(dtype))
            assert torch.isfinite(w).all() and (w >= 0).all(), (nadir, losses, w)
            assert torch.isfinite((w.to(dtype) * losses.to(dtype)).sum())


def test_stch_zero_loss_step_in_a_model():
    model = Tiny(3)
    scales = torch.tensor([0.0, 1.0, 1e4], dtype=torch.float64)
    bal = STCH(3, warmup_epoch=0)
    for phase in ("nadir", "stch"):
        assert bal.phase == phase
        losses = model.losses(scales)
        w = bal.weights(losses.detach())
        assert torch.isfinite(param_grads(model, (w.double() * losses).sum())).all()
        bal.update(losses.detach())
        bal.end_epoch()


# ----------------------------------------------------------------------------------------------------
# Types, devices, host syncs, state

@pytest.mark.parametrize("make", [lambda: GLS(3), lambda: STCH(3, warmup_epoch=0)])
def test_weights_float32_detached(make):
    bal = make()
    losses = torch.tensor([0.5, 1.0, 2.0], requires_grad=True)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for _ in range(2):
            w = bal.weights(losses.to(dtype))
            assert w.dtype == torch.float32 and not w.requires_grad and w.device == losses.device
            bal.update(losses.detach().to(dtype))
            bal.end_epoch()
    total = bal(losses)
    total.backward()
    assert torch.isfinite(losses.grad).all()


def test_no_host_sync_through_all_phases():
    # On the meta device any read-back (.item(), bool(tensor)) raises.
    for bal in (GLS(3).to("meta"), STCH(3, warmup_epoch=1).to("meta"),
                STCH(3, warmup_iters=2, nadir_iters=2).to("meta")):
        losses = torch.rand(3, device="meta")
        for _ in range(4):
            for _ in range(3):
                w = bal.weights(losses)
                assert w.device.type == "meta" and w.dtype == torch.float32
                bal.update(losses)
            bal.end_epoch()
        assert getattr(bal, "phase", "stch") == "stch"


def _round_trip(bal):
    buf = io.BytesIO()
    torch.save(bal.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kw,epochs_before,steps_before", [
    ({"warmup_epoch": 2}, 1, 2),     # mid warm-up
    ({"warmup_epoch": 2}, 2, 2),     # mid nadir epoch (partial sum)
    ({"warmup_epoch": 2}, 4, 1),     # after
    ({"warmup_epoch": 0, "mu": 0.2}, 0, 2),
    ({"warmup_iters": 3, "nadir_iters": 4}, 0, 5),
    ({"warmup_iters": 3, "nadir_iters": 4}, 0, 9),
])
def test_stch_state_dict_resumes_identically(kw, epochs_before, steps_before):
    g = torch.Generator().manual_seed(7)
    stream = [torch.rand(3, generator=g) * torch.tensor([1e-4, 1.0, 1e3]) + 1e-6 for _ in range(60)]
    bal = STCH(3, **kw)
    it = iter(stream)
    for _ in range(epochs_before):
        for _ in range(3):
            losses = next(it)
            bal.weights(losses)
            bal.update(losses)
        bal.end_epoch()
    for _ in range(steps_before):
        losses = next(it)
        bal.weights(losses)
        bal.update(losses)
    phase = bal.phase
    state = _round_trip(bal)
    assert set(state) == {"loss_sum", "nadir", "_extra_state"}
    other = STCH(3, **kw)
    other.load_state_dict(state)
    assert other.phase == phase
    for i, losses in enumerate(it):
        wa, wb = bal.weights(losses), other.weights(losses)
        assert torch.equal(wa, wb), (i, bal.phase)
        bal.update(losses)
        other.update(losses)
        if i % 3 == 2:
            bal.end_epoch()
            other.end_epoch()
    assert bal.phase == "stch"
    for (ka, a), (kb, b) in zip(bal.state_dict().items(), other.state_dict().items()):
        assert ka == kb
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_gls_state_dict_is_empty_and_loads():
    bal = GLS(2)
    state = _round_trip(bal)
    assert dict(state) == {}
    GLS(2).load_state_dict(state)


def test_toy_training_lowers_the_losses():
    # the loop of weighting.py's docstring on the tiny model (float64 model, float32 weights), Adam
    for bal in (GLS(3), STCH(3, warmup_epoch=1), STCH(3, warmup_iters=5, nadir_iters=5)):
        model = Tiny(3, seed=3)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        scales = torch.tensor([0.01, 1.0, 100.0], dtype=torch.float64)
        first = model.losses(scales).detach()
        for step in range(120):
            losses = model.losses(scales)
            w = bal.weights(losses.detach())
            opt.zero_grad()
            (w.double() * losses).sum().backward()
            opt.step()
            bal.update(losses.detach())
            if step % 20 == 19:
                bal.end_epoch()
        last = model.losses(scales).detach()
        assert (last < first).all() and math.isfinite(float(last.sum())), (bal, first, last)
