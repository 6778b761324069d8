"""TAG's network selection (``mtvision.relations.grouping``) against a brute force written out here: every
set of at most k groups out of the 2^T - 1 candidate groups, scored by the definition."""

from __future__ import annotations

import itertools

import pytest
import torch

from mtvision.relations import group_affinity, groupings_for_budgets, select_groups


def _score(A, groups, T) -> float:
    """Mean over tasks of the best affinity any group containing the task gives it (alone: 0)."""
    total = 0.0
    for j in range(T):
        best = -float("inf")
        for g in groups:
            if j in g:
                others = [i for i in g if i != j]
                best = max(best, sum(A[i][j] for i in others) / len(others) if others else 0.0)
        total += best
    return total / T


def _brute_force(A, T, k, overlap):
    candidates = [c for r in range(1, T + 1) for c in itertools.combinations(range(T), r)]
    best, best_groups = -float("inf"), None
    for n in range(1, k + 1):
        for groups in itertools.combinations(candidates, n):
            if len({j for g in groups for j in g}) < T:
                continue
            if not overlap and sum(len(g) for g in groups) != T:
                continue
            s = _score(A, groups, T)
            if s > best:
                best, best_groups = s, groups
    return best, best_groups


@pytest.mark.parametrize("T", [2, 3, 4])
@pytest.mark.parametrize("overlap", [True, False])
def test_best_grouping_equals_brute_force(T, overlap):
    gen = torch.Generator().manual_seed(T + 10 * overlap)
    tasks = [f"t{i}" for i in range(T)]
    for _ in range(4):
        A = torch.randn(T, T, generator=gen, dtype=torch.float64)
        for k in range(1, T + 1):
            got = select_groups(A, tasks, k, overlap=overlap)
            want, want_groups = _brute_force(A.tolist(), T, k, overlap)
            assert got.score == pytest.approx(want, abs=1e-12), (k, got, want_groups)
            assert len(got.groups) <= k
            # the returned groups and assignment really score what they claim
            idx = [[tasks.index(t) for t in g] for g in got.groups]
            assert _score(A.tolist(), idx, T) == pytest.approx(got.score, abs=1e-12)
            for t, g in got.served_by.items():
                assert t in got.groups[g]
                assert group_affinity(A, idx[g], tasks.index(t)) == pytest.approx(
                    max(group_affinity(A, grp, tasks.index(t)) for grp in idx if tasks.index(t) in grp))
            if not overlap:
                assert sorted(t for g in got.groups for t in g) == sorted(tasks)


def test_planted_clusters_are_recovered():
    """Two clusters that help each other inside and hurt each other across: k=2 recovers them."""
    tasks = ["a", "b", "c", "d", "e"]
    cluster = [0, 0, 1, 1, 1]
    A = torch.tensor([[0.05 if i == j else (0.02 if cluster[i] == cluster[j] else -0.03) for j in range(5)]
                      for i in range(5)], dtype=torch.float64)
    g2 = select_groups(A, tasks, 2)
    assert sorted(g2.groups) == [["a", "b"], ["c", "d", "e"]]
    assert g2.score == pytest.approx(0.02)
    g1 = select_groups(A, tasks, 1)  # one network: all tasks together
    assert g1.groups == [tasks]
    by_k = groupings_for_budgets(A, tasks)
    assert [g.k for g in by_k] == [1, 2, 3, 4, 5]
    assert all(x.score <= y.score + 1e-15 for x, y in zip(by_k, by_k[1:]))  # a larger budget never loses


def test_overlapping_groups_serve_a_task_from_its_best_helper():
    """c helps both a and b but gets nothing back: with overlap, c helps train both networks."""
    tasks = ["a", "b", "c"]
    A = torch.tensor([[0.0, -0.05, 0.0], [-0.05, 0.0, 0.0], [0.04, 0.04, 0.0]], dtype=torch.float64)
    got = select_groups(A, tasks, 2)
    assert sorted(got.groups) == [["a", "c"], ["b", "c"]]
    assert got.score == pytest.approx((0.04 + 0.04 + 0.0) / 3)
    assert select_groups(A, tasks, 2, overlap=False).score < got.score


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="expected \\(3, 3\\)"):
        select_groups(torch.zeros(2, 2), ["a", "b", "c"], 1)
    with pytest.raises(ValueError, match="non-finite"):
        select_groups(torch.tensor([[0.0, float("nan")], [0.0, 0.0]]), ["a", "b"], 1)
    with pytest.raises(ValueError, match="at least 1"):
        select_groups(torch.zeros(2, 2), ["a", "b"], 0)


def test_task_groups_spearman_against_a_hand_count():
    from ..test_tools import _tool

    spearman = _tool("task_groups")._spearman
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1,2,3,4,5) vs (2,1,4,3,5): sum d^2 = 4, rho = 1 - 6*4 / (5*24) = 0.8
    assert spearman([0.1, 0.2, 0.3, 0.4, 0.5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    # ties get average ranks: x ranks (1.5,1.5,3), y ranks (1,2,3): Pearson of the ranks
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254037844387)
