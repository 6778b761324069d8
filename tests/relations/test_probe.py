"""The task-relation probe (``mtvision.relations.probe``) against a direct computation, and on a planted
structure: a task built to conflict with another, and a related one."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mtvision.relations import TaskGradientProbe, TaskRelations, cosine_from_gram, select_groups


class _Shared(nn.Module):
    """A shared trunk (with BatchNorm and dropout: the probe must leave both as it found them) and one
    linear head per task."""

    def __init__(self, tasks: int, dtype=torch.float64):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Dropout(0.2),
                                   nn.Linear(12, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(tasks))
        self.to(dtype)

    def shared_parameters(self):
        return list(self.trunk.parameters())

    def forward(self, x):
        h = self.trunk(x)
        return [head(h).squeeze(-1) for head in self.heads]


def _losses(model, x, targets):
    return torch.stack([((out - y) ** 2).mean() for out, y in zip(model(x), targets)])


def _direct(model, x, targets, lr, seed):
    """Per-task gradients, Gramian and lookahead affinity, one task and one model copy at a time."""
    T = len(targets)
    grads = []
    for t in range(T):
        m = copy.deepcopy(model)
        torch.manual_seed(seed)
        loss = _losses(m, x, targets)[t]
        g = torch.autograd.grad(loss, m.shared_parameters())
        grads.append(torch.cat([v.reshape(-1) for v in g]))
    G = torch.stack(grads)
    m = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        base = _losses(m, x, targets)
    Z = torch.empty(T, T, dtype=torch.float64)
    for i in range(T):
        m = copy.deepcopy(model)
        with torch.no_grad():
            at = 0
            for p in m.shared_parameters():
                p -= lr * G[i, at: at + p.numel()].view_as(p)
                at += p.numel()
            torch.manual_seed(seed)
            Z[i] = 1 - _losses(m, x, targets) / base
    return G @ G.T, base, Z


def test_gramian_and_lookahead_affinity_equal_a_direct_computation():
    torch.manual_seed(0)
    model = _Shared(3).train()
    x = torch.randn(32, 6, dtype=torch.float64)
    targets = [torch.randn(32, dtype=torch.float64) for _ in range(3)]
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)  # the random state the measurement starts from (dropout masks)
    probe = TaskGradientProbe(model.shared_parameters(), model)
    result = probe.measure(lambda: _losses(model, x, targets), lookahead_lr=0.05)
    after = torch.rand(3)  # training goes on with the random state it had
    gram, base, Z = _direct(model, x, targets, 0.05, seed=123)
    torch.testing.assert_close(result.gram, gram, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(result.losses, base, rtol=1e-12, atol=0)
    torch.testing.assert_close(result.affinity, Z, rtol=1e-9, atol=1e-12)
    # left as found: the parameters, the BatchNorm statistics, the random state
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), k
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))
    # the affinity of a task on itself is its own lookahead loss decrease, positive for a small step
    assert (result.affinity.diagonal() > 0).all()


def test_planted_conflict_and_relation_are_flagged():
    """Tasks a (target y), b (2y + noise: related) and c (-y: conflicting) on one shared scalar feature
    (all heads read it the same way at the start), measured over several batches as the monitor does:
    the a-c pair conflicts in every measurement and has negative affinity both ways; a-b and b-a are
    positive; TAG's grouping for two networks puts a with b and c alone."""
    torch.manual_seed(0)
    model = _Shared(3)
    with torch.no_grad():  # the heads start equal: the conflict must come from the targets alone
        for head in model.heads[1:]:
            head.load_state_dict(model.heads[0].state_dict())
    w = torch.randn(6, dtype=torch.float64)
    relations = TaskRelations(["a", "b", "c"])
    probe = TaskGradientProbe(model.shared_parameters(), model)
    gen = torch.Generator().manual_seed(1)
    for _ in range(8):
        x = torch.randn(64, 6, generator=gen, dtype=torch.float64)
        y = torch.tanh(x @ w)
        targets = [y, 2 * y + 0.05 * torch.randn(64, generator=gen, dtype=torch.float64), -y]
        r = probe.measure(lambda: _losses(model, x, targets), lookahead_lr=0.1)
        assert relations.add_gram(r.gram) and relations.add_affinity(r.affinity)
    s = relations.summary()
    a, b, c = 0, 1, 2
    assert s["gradients"]["conflict_fraction"][a][c] == 1.0
    assert s["gradients"]["conflict_fraction"][a][b] == 0.0
    assert s["gradients"]["mean_cosine"][a][c] < -0.5 < 0.5 < s["gradients"]["mean_cosine"][a][b]
    Z = relations.mean_affinity
    assert Z[a, c] < 0 and Z[c, a] < 0
    assert Z[a, b] > 0 and Z[b, a] > 0
    grouping = select_groups(Z, relations.tasks, 2, overlap=False)
    assert sorted(grouping.groups) == [["a", "b"], ["c"]]


def test_cosine_from_gram():
    g = torch.tensor([[1.0, 2.0, 0.0], [-1.0, 0.5, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    cos = cosine_from_gram(g @ g.T)
    want = torch.nn.functional.cosine_similarity(g[0], g[1], dim=0)
    assert cos[0, 1] == pytest.approx(float(want))
    assert cos[0, 2] == 0 and cos[2, 2] == 1  # a zero gradient: no direction


def test_non_finite_losses_give_no_measurement():
    model = _Shared(2)
    x = torch.randn(8, 6, dtype=torch.float64)
    probe = TaskGradientProbe(model.shared_parameters(), model)
    nan = torch.full((8,), float("nan"), dtype=torch.float64)
    assert probe.measure(lambda: _losses(model, x, [nan, torch.zeros(8, dtype=torch.float64)]), 0.1) is None
    relations = TaskRelations(["a", "b"])
    assert not relations.add_gram(torch.full((2, 2), float("inf")))
    assert relations.gradient_steps == 0


def test_a_loss_scale_gives_the_same_gramian():
    """fp16 training scales the losses for the backward passes; the probe unscales the gradients."""
    torch.manual_seed(0)
    model = _Shared(2)
    x = torch.randn(16, 6, dtype=torch.float64)
    targets = [torch.randn(16, dtype=torch.float64) for _ in range(2)]
    probe = TaskGradientProbe(model.shared_parameters(), model)
    plain = probe.measure(lambda: _losses(model, x, targets), 0.1)
    scaled = probe.measure(lambda: _losses(model, x, targets), 0.1, loss_scale=1024.0)
    torch.testing.assert_close(scaled.gram, plain.gram, rtol=1e-12, atol=0)
    torch.testing.assert_close(scaled.affinity, plain.affinity, rtol=1e-10, atol=1e-14)
