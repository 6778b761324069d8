"""Loss-weighting methods (mtvision.balancing.weighting) against their papers' definitions."""

import io
import math

import pytest
import torch
from torch import nn

from mtvision.balancing import LOSS_WEIGHTINGS
from mtvision.balancing.learned_weighting import FAMO, GradNorm, _adam_step
from mtvision.balancing.weighting import DWA, EW, RLW, UW, LossWeighting


# ----------------------------------------------------------------------------------------------------
# A toy two-task model: shared tanh layer, two linear heads, regression targets.

def _toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=g)
    y = x @ torch.randn(6, 2, generator=g)
    torch.manual_seed(seed)
    shared = nn.Linear(6, 8)
    heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 1)])
    return x, y, shared, heads


def _toy_losses(x, y, shared, heads, scale=(1.0, 1.0)):
    h = torch.tanh(shared(x))
    return torch.stack([((heads[t](h)[:, 0] - y[:, t]) ** 2).mean() * scale[t] for t in range(2)])


def _train(bal: LossWeighting, steps=40, scale=(1.0, 1.0), opt="adam", lr=0.02):
    """The trainer protocol of the module docstring on the toy model; returns (first, last) losses."""
    x, y, shared, heads = _toy()
    params = list(shared.parameters()) + list(heads.parameters())
    optimizer = torch.optim.Adam(params, lr=lr) if opt == "adam" else torch.optim.SGD(params, lr=lr)
    if list(bal.parameters()):
        optimizer.add_param_group({"params": list(bal.parameters()), "lr": 0.025, "weight_decay": 0.0})
    first = None
    for _ in range(steps):
        losses = _toy_losses(x, y, shared, heads, scale)
        if first is None:
            first = losses.detach().clone()
        w = bal.weights(losses.detach())
        assert not w.requires_grad and w.shape == (2,)
        total = (w * losses).sum()
        extra = bal.extra_loss(losses)
        if extra is not None:
            total = total + extra
        if bal.requires_shared_parameters:
            bal.pre_backward(losses, list(shared.parameters()))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        new = None
        if bal.requires_new_losses:
            with torch.no_grad():
                new = _toy_losses(x, y, shared, heads, scale)
        bal.update(losses.detach(), new)
    with torch.no_grad():
        last = _toy_losses(x, y, shared, heads, scale)
    return first, last


def _make(name):
    special = {"dwa": lambda: DWA(2, window=5), "rlw": lambda: RLW(2, seed=3)}
    return special.get(name, lambda: LOSS_WEIGHTINGS[name](2))()


# ----------------------------------------------------------------------------------------------------
# EW

def test_ew_static_weights():
    losses = torch.tensor([2.0, 3.0, 5.0], requires_grad=True)
    assert torch.equal(EW(3).weights(losses.detach()), torch.ones(3))
    bal = EW(3, weights=[0.5, 1.0, 2.0])
    assert torch.equal(bal.weights(losses.detach()), torch.tensor([0.5, 1.0, 2.0]))
    total = bal(losses)
    assert total.item() == pytest.approx(0.5 * 2 + 3 + 2 * 5)
    total.backward()
    assert torch.equal(losses.grad, torch.tensor([0.5, 1.0, 2.0]))
    assert bal.extra_loss(losses) is None
    assert len(bal.state_dict()) == 0  # static: the weights come from the config


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="3 entries, expected 2"):
        EW(2, weights=[1, 1, 1])
    with pytest.raises(ValueError, match=">= 0"):
        EW(2, weights=[1, -1])
    with pytest.raises(ValueError, match="positive integer"):
        UW(0)
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        FAMO(3).weights(torch.ones(2))
    with pytest.raises(ValueError, match="new_task_losses"):
        FAMO(2).update(torch.ones(2))
    with pytest.raises(ValueError, match="no graph"):
        GradNorm(2).pre_backward(torch.ones(2), [nn.Parameter(torch.ones(1))])
    with pytest.raises(ValueError, match="window"):
        DWA(2, window=0)


# ----------------------------------------------------------------------------------------------------
# UW

def test_uw_total_and_gradient_equal_the_formula():
    bal = UW(2)
    assert torch.allclose(bal.log_vars, torch.tensor([-0.5, -0.5]))  # LibMTL's initial value
    with torch.no_grad():
        bal.log_vars.copy_(torch.tensor([0.3, -0.7]))
    losses = torch.tensor([2.0, 0.5], requires_grad=True)
    total = bal(losses)

    s = torch.tensor([0.3, -0.7], requires_grad=True)
    ref_losses = torch.tensor([2.0, 0.5], requires_grad=True)
    ref = (0.5 * torch.exp(-s) * ref_losses + 0.5 * s).sum()
    ref.backward()
    total.backward()
    assert total.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(bal.log_vars.grad, s.grad, rtol=1e-6)
    assert torch.allclose(losses.grad, ref_losses.grad, rtol=1e-6)
    # by hand: d/ds_t = 0.5 - 0.5 exp(-s_t) L_t; weights 0.5 exp(-s_t); extra's value 0.5 sum s
    expected = [0.5 - 0.5 * math.exp(-0.3) * 2.0, 0.5 - 0.5 * math.exp(0.7) * 0.5]
    assert bal.log_vars.grad.tolist() == pytest.approx(expected, rel=1e-6)
    assert bal.weights(losses.detach()).tolist() == pytest.approx([0.5 * math.exp(-0.3), 0.5 * math.exp(0.7)])
    assert bal.extra_loss(losses).item() == pytest.approx(0.5 * (0.3 - 0.7))


def test_uw_learns_the_loss_scale():
    # With the losses held fixed, the objective's minimum in s_t is s_t = log L_t.
    bal = UW(2)
    losses = torch.tensor([4.0, 0.25])
    opt = torch.optim.SGD(bal.parameters(), lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        bal(losses).backward()
        opt.step()
    assert bal.log_vars.detach().tolist() == pytest.approx([math.log(4.0), math.log(0.25)], abs=1e-3)


# ----------------------------------------------------------------------------------------------------
# DWA

def test_dwa_weights_from_window_averages():
    bal = DWA(3, temp=2.0, window=2)
    history = [[3.0, 2.0, 1.0], [1.0, 2.0, 1.0],   # window 1: means 2.0, 2.0, 1.0
               [1.5, 1.0, 0.9], [0.5, 1.4, 0.7],   # window 2: means 1.0, 1.2, 0.8
               [0.6, 1.0, 0.8], [0.4, 1.0, 0.8]]   # window 3: means 0.5, 1.0, 0.8
    seen = []
    for losses in history:
        losses = torch.tensor(losses)
        seen.append(bal.weights(losses))
        bal.update(losses)
    # equal weights during the first two windows
    for w in seen[:4]:
        assert torch.equal(w, torch.ones(3))

    def dwa(prev, last):
        e = [math.exp(l / p / 2.0) for p, l in zip(prev, last)]
        return [3 * v / sum(e) for v in e]

    expected3 = dwa([2.0, 2.0, 1.0], [1.0, 1.2, 0.8])
    assert seen[4].tolist() == pytest.approx(expected3, rel=1e-6)
    assert seen[5].tolist() == pytest.approx(expected3, rel=1e-6)
    expected4 = dwa([1.0, 1.2, 0.8], [0.5, 1.0, 0.8])
    w4 = bal.weights(torch.ones(3))
    assert w4.tolist() == pytest.approx(expected4, rel=1e-6)
    assert w4.sum().item() == pytest.approx(3.0)
    # the task whose loss fell least gets the largest weight
    assert int(w4.argmax()) == 2


def test_dwa_epochs_and_zero_average():
    bal = DWA(2)  # window=None: end_epoch closes the window
    bal.end_epoch()  # an empty epoch changes nothing
    for epoch_losses in ([[1.0, 0.0], [3.0, 0.0]], [[1.0, 1.0]]):
        for losses in epoch_losses:
            bal.update(torch.tensor(losses))
        bal.end_epoch()
    # epoch means: [2, 0] then [1, 1]; a ratio over a zero mean is taken as 1
    e = [math.exp(0.5 / 2), math.exp(1.0 / 2)]
    assert bal.weights(torch.ones(2)).tolist() == pytest.approx([2 * v / sum(e) for v in e], rel=1e-6)


# ----------------------------------------------------------------------------------------------------
# RLW

def test_rlw_weights_are_softmax_of_normal_draws():
    bal = RLW(4, seed=7)
    ref = torch.Generator().manual_seed(7)
    losses = torch.ones(4)
    draws = []
    for _ in range(5):
        w = bal.weights(losses)
        expected = torch.softmax(torch.randn(4, generator=ref), dim=0)
        assert torch.allclose(w, expected)
        assert w.sum().item() == pytest.approx(1.0)  # the paper's convention: weights sum to 1
        assert (w > 0).all()
        draws.append(w)
    assert not torch.equal(draws[0], draws[1])  # a fresh draw every step

    gen = torch.Generator().manual_seed(11)
    ref = torch.Generator().manual_seed(11)
    given = RLW(3, generator=gen)
    for _ in range(3):
        assert torch.allclose(given.weights(torch.ones(3)), torch.softmax(torch.randn(3, generator=ref), 0))


# ----------------------------------------------------------------------------------------------------
# FAMO

def test_famo_weights_give_the_authors_gradient():
    # The authors' loss: sum_t z_t log(D_t) / c with c = sum z/D detached; ours: sum_t w_t L_t.
    x, y, shared, heads = _toy()
    bal = FAMO(2, min_losses=[0.01, 0.02])
    bal.logits.copy_(torch.tensor([0.4, -0.3]))
    params = list(shared.parameters()) + list(heads.parameters())

    losses = _toy_losses(x, y, shared, heads)
    ours = torch.autograd.grad((bal.weights(losses.detach()) * losses).sum(), params)
    losses = _toy_losses(x, y, shared, heads)
    z = torch.softmax(torch.tensor([0.4, -0.3]), 0)
    d = losses - torch.tensor([0.01, 0.02]) + 1e-8
    c = (z / d).sum().detach()
    theirs = torch.autograd.grad((d.log() * z / c).sum(), params)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert bal.weights(losses.detach()).sum().item() == pytest.approx(1.0)


def test_famo_update_hand_case():
    gamma, lr = 0.01, 0.025
    bal = FAMO(2, gamma=gamma, lr=lr)
    prev, new = torch.tensor([2.0, 1.0]), torch.tensor([1.5, 0.9])
    bal.update(prev, new)
    delta = [math.log(2.0 / 1.5), math.log(1.0 / 0.9)]
    z = [0.5, 0.5]  # softmax of the zero logits
    zd = sum(a * b for a, b in zip(z, delta))
    grad = [zi * (di - zd) for zi, di in zip(z, delta)]  # + gamma * logits, which are 0
    # Adam's first step: m_hat = g, v_hat = g^2, so the logits move by -lr * g / (|g| + eps)
    expected = [-lr * g / (abs(g) + 1e-8) for g in grad]
    assert bal.logits.tolist() == pytest.approx(expected, rel=1e-5)
    # the task whose loss fell more (in log) loses weight
    assert bal.logits[0] < bal.logits[1]


def test_famo_matches_the_authors_update_over_many_steps():
    # The authors' update (famo.py): Adam(weight_decay=gamma) on the logits, gradient = VJP of softmax
    # with delta.
    g = torch.Generator().manual_seed(0)
    bal = FAMO(3, gamma=0.01, lr=0.025, min_losses=[0.0, 0.1, 0.05])
    w = torch.zeros(3, requires_grad=True)
    w_opt = torch.optim.Adam([w], lr=0.025, weight_decay=0.01)
    mins = torch.tensor([0.0, 0.1, 0.05])
    for _ in range(20):
        prev = 0.3 + torch.rand(3, generator=g)
        curr = 0.3 + torch.rand(3, generator=g)
        bal.update(prev, curr)
        delta = (prev - mins + 1e-8).log() - (curr - mins + 1e-8).log()
        d = torch.autograd.grad(torch.softmax(w, -1), w, grad_outputs=delta)[0]
        w_opt.zero_grad()
        w.grad = d
        w_opt.step()
        assert torch.allclose(bal.logits, w.detach(), rtol=1e-5, atol=1e-6)


def test_adam_step_equals_torch_adam():
    g = torch.Generator().manual_seed(1)
    p_ref = torch.randn(5, generator=g).requires_grad_()
    opt = torch.optim.Adam([p_ref], lr=0.1, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    p = p_ref.detach().clone()
    m, v, step = torch.zeros(5), torch.zeros(5), torch.zeros(())
    for _ in range(15):
        grad = torch.randn(5, generator=g)
        p_ref.grad = grad.clone()
        opt.step()
        _adam_step(p, grad, m, v, step, 0.1, (0.8, 0.99), 1e-6, 0.05)
        assert torch.allclose(p, p_ref.detach(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# GradNorm

def _gradnorm_case():
    # L_1 = 3 p0 + 4 p1 - 4 (||grad_p L_1|| = 5) and L_2 = p0 (norm 1), both 1.0 at p = (1, 0.5).
    p = nn.Parameter(torch.tensor([1.0, 0.5]))
    losses = torch.stack([3 * p[0] + 4 * p[1] - 4.0, p[0]])
    return p, losses


def test_gradnorm_hand_case():
    lr = 0.025
    bal = GradNorm(2, alpha=1.5, lr=lr)
    p, losses = _gradnorm_case()
    w = bal.weights(losses.detach())
    bal.pre_backward(losses, [p])
    assert torch.equal(w, torch.ones(2))  # this step's weights are those from before the update
    # r = 1 (first step), G = [5, 1], target = mean(G) = 3, L_grad = |5-3| + |1-3| = 4,
    # dL_grad/dw = sign(G - target) * norms = [5, -1]; Adam's first step moves by -lr * sign; sum stays 2
    assert bal.last_grad_loss.item() == pytest.approx(4.0)
    assert bal.task_weights.tolist() == pytest.approx([1 - lr, 1 + lr], rel=1e-5)
    assert bal.initial_losses.tolist() == pytest.approx([1.0, 1.0])
    losses.sum().backward()  # the graph is still usable after pre_backward
    assert p.grad.tolist() == pytest.approx([4.0, 4.0])


def test_gradnorm_matches_its_definition_over_steps():
    # Reference: L_grad = sum_t |w_t ||grad_W L_t|| - mean(G) r_t^alpha| with the targets detached,
    # differentiated by autograd in w, one torch Adam step, renormalised to sum T; the model moves between
    # steps so the loss ratios r_t differ from 1.
    torch.manual_seed(0)
    x, y, shared, heads = _toy()
    alpha, lr = 1.5, 0.05
    bal = GradNorm(2, alpha=alpha, lr=lr)
    w = torch.ones(2, requires_grad=True)
    w_opt = torch.optim.Adam([w], lr=lr)
    opt = torch.optim.SGD(list(shared.parameters()) + list(heads.parameters()), lr=0.1)
    last = list(shared.parameters())
    l0 = None
    for _ in range(6):
        losses = _toy_losses(x, y, shared, heads, scale=(1.0, 0.2))
        if l0 is None:
            l0 = losses.detach()
        per_task = [torch.autograd.grad(losses[t], last, retain_graph=True) for t in range(2)]
        norms = torch.stack([torch.cat([g.flatten() for g in grads]).norm() for grads in per_task])
        ratio = losses.detach() / l0
        r = ratio / ratio.mean()
        g = w * norms
        target = (g.mean() * r ** alpha).detach()
        grad_loss = (g - target).abs().sum()
        w_opt.zero_grad()
        grad_loss.backward(inputs=[w])
        w_opt.step()
        with torch.no_grad():
            w.mul_(2 / w.sum())

        step_w = bal.weights(losses.detach())
        bal.pre_backward(losses, last)
        assert bal.last_grad_loss.item() == pytest.approx(grad_loss.item(), rel=1e-5)
        assert torch.allclose(bal.task_weights, w.detach(), rtol=1e-5, atol=1e-6)
        opt.zero_grad()
        (step_w * losses).sum().backward()
        opt.step()


def test_gradnorm_reaches_its_targets_on_a_fixed_model():
    # With the model fixed (r = 1) the targets are G_1 = G_2: w_1 * 5 = w_2 * 1 and w_1 + w_2 = 2.
    bal = GradNorm(2, lr=0.025)
    p, losses = _gradnorm_case()
    grad_losses = []
    for _ in range(150):
        bal.pre_backward(losses, [p])
        grad_losses.append(bal.last_grad_loss.item())
    assert bal.task_weights.tolist() == pytest.approx([1 / 3, 5 / 3], abs=0.05)
    assert bal.task_weights.sum().item() == pytest.approx(2.0)
    assert max(grad_losses[-10:]) < 0.1 * grad_losses[0]


def test_gradnorm_balances_training_rates():
    # Task 2's loss is scaled by 0.05, so under equal weights it trains far more slowly (its loss ratio
    # L(t)/L(0) stays high). GradNorm must raise its weight and bring the two training rates closer.
    def rates(bal):
        first, last = _train(bal, steps=60, scale=(1.0, 0.05), opt="sgd", lr=0.05)
        return last / first

    ew = rates(EW(2))
    bal = GradNorm(2)
    gn = rates(bal)
    w = bal.task_weights
    assert w[1] > 1.5 * w[0]
    assert w.sum().item() == pytest.approx(2.0)
    assert (gn.max() / gn.min()) < 0.5 * (ew.max() / ew.min())


# ----------------------------------------------------------------------------------------------------
# All methods

@pytest.mark.parametrize("name", sorted(LOSS_WEIGHTINGS))
def test_toy_training_lowers_both_losses(name):
    first, last = _train(_make(name), steps=40)
    assert (last < 0.5 * first).all(), f"{name}: losses {first.tolist()} -> {last.tolist()}"


@pytest.mark.parametrize("name", sorted(LOSS_WEIGHTINGS))
def test_state_dict_round_trip(name):
    bal = _make(name)
    _train(bal, steps=12)
    buf = io.BytesIO()
    torch.save(bal.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = _make(name)
    other.load_state_dict(state)
    for a, b in zip(bal.state_dict().values(), other.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    # both continue identically: weights and state after more steps
    x, y, shared, heads = _toy(seed=1)
    for _ in range(7):
        losses = _toy_losses(x, y, shared, heads)
        wa, wb = bal.weights(losses.detach()), other.weights(losses.detach())
        assert torch.equal(wa, wb)
        if bal.requires_shared_parameters:
            bal.pre_backward(losses, list(shared.parameters()))
            other.pre_backward(losses, list(shared.parameters()))
        new = losses.detach() * 0.9
        bal.update(losses.detach(), new)
        other.update(losses.detach(), new)
        with torch.no_grad():
            shared.weight.mul_(0.97)
    for (ka, a), (kb, b) in zip(bal.state_dict().items(), other.state_dict().items()):
        assert ka == kb
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), ka


def test_no_host_sync_in_the_step_hooks():
    # On the meta device any host sync (.item(), bool(tensor), .tolist()) raises, so running the hooks
    # there shows that weights / extra_loss / pre_backward / update / end_epoch never read a value back.
    with pytest.raises(Exception):
        float(torch.ones(1, device="meta"))
    for name in ("ew", "uw", "dwa", "gradnorm", "famo"):
        bal = _make(name).to("meta")
        losses = torch.rand(2, device="meta")
        for _ in range(6):
            w = bal.weights(losses)
            assert w.device.type == "meta" and w.shape == (2,)
            bal.extra_loss(losses)
            if bal.requires_shared_parameters:
                p = nn.Parameter(torch.rand(3, device="meta"))
                bal.pre_backward(p.sum() * torch.arange(1.0, 3.0, device="meta"), [p])
            bal.update(losses, losses * 0.5)
        bal.end_epoch()
