"""Which tasks to train together, from their inter-task affinities: TAG's network selection (Fifty et al.,
NeurIPS 2021, section 3.3), solved exactly.

A group of tasks is one network trained on those tasks. The affinity a group ``G`` gives its member
``j`` is the mean lookahead affinity onto ``j`` from the group's other members,
``s(G, j) = mean_{i in G, i != j} Z[i, j]``; a task alone in its group gets 0 (no transfer). With a budget
of ``k`` networks, a grouping is a set of at most ``k`` groups covering every task; groups may overlap
(TAG's setting: a task may help train a network whose prediction for it is not used), and each task is
served by the group that gives it the highest affinity. The grouping's score is the mean over tasks of that
affinity; :func:`select_groups` returns the best one.

Exhaustive, without enumerating sets of groups: each task is served by exactly one group, so a grouping is
a partition of the tasks into at most ``k`` served blocks, each block ``B`` taking the best group
``G ⊇ B`` for it. The best group of every block (3^T pairs) and the best partition (dynamic programming over
subsets, k * 3^T) give the optimum over all groupings; T = 8 takes well under a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Grouping", "group_affinity", "groupings_for_budgets", "select_groups"]

MAX_TASKS = 10


@dataclass
class Grouping:
    """The best grouping for a budget of ``k`` networks.

    Attributes:
        k: the budget.
        groups: the groups (task names, in task order), at most ``k``.
        served_by: per task, the index in ``groups`` of the group whose prediction it uses.
        score: the mean over tasks of the affinity their serving group gives them.
    """

    k: int
    groups: list[list[str]]
    served_by: dict[str, int]
    score: float

    def as_dict(self) -> dict:
        return {"k": self.k, "groups": self.groups, "served_by": self.served_by, "score": self.score}


def _bits(mask: int, T: int) -> list[int]:
    return [j for j in range(T) if mask >> j & 1]


def group_affinity(affinity: Tensor, group: Sequence[int], task: int) -> float:
    """``s(G, j)``: the mean affinity onto ``task`` from the other members of ``group`` (0 if alone)."""
    others = [i for i in group if i != task]
    if not others:
        return 0.0
    return float(sum(float(affinity[i, task]) for i in others) / len(others))


def select_groups(affinity: Tensor, tasks: Sequence[str], k: int, overlap: bool = True) -> Grouping:
    """The best grouping of ``tasks`` into at most ``k`` networks by TAG's criterion (module docstring).

    ``affinity``: ``[T,T]``, ``affinity[i, j]`` = the lookahead affinity of task i onto task j.
    ``overlap``: groups may share tasks (TAG); False: the groups partition the tasks."""
    A = torch.as_tensor(affinity, dtype=torch.float64).cpu()
    T = len(tasks)
    if A.shape != (T, T):
        raise ValueError(f"select_groups: affinity is {tuple(A.shape)}, expected ({T}, {T}) for tasks "
                         f"{list(tasks)}")
    if not 1 <= T <= MAX_TASKS:
        raise ValueError(f"select_groups: 1 to {MAX_TASKS} tasks, got {T}")
    if k < 1:
        raise ValueError(f"select_groups: the budget k must be at least 1, got {k}")
    if not bool(torch.isfinite(A).all()):
        raise ValueError("select_groups: the affinity matrix has non-finite entries")
    full = (1 << T) - 1
    # s[G][j] for every group G and member j
    s = [[0.0] * T for _ in range(full + 1)]
    for G in range(1, full + 1):
        members = _bits(G, T)
        for j in members:
            s[G][j] = group_affinity(A, members, j)
    # best group G ⊇ B serving block B, and its total affinity over B
    best_total = [float("-inf")] * (full + 1)
    best_group = [0] * (full + 1)
    for B in range(1, full + 1):
        served = _bits(B, T)
        rest = full & ~B
        extra = rest if overlap else 0
        while True:  # every subset of the tasks outside B (none without overlap), the empty one last
            G = B | extra
            total = sum(s[G][j] for j in served)
            if total >= best_total[B] - 1e-12:  # ties: the smaller group (fewer tasks to train)
                best_total[B], best_group[B] = total, G
            if extra == 0:
                break
            extra = (extra - 1) & rest
    # f[m][S]: best total over partitions of S into at most m blocks
    f = [best_total[:]]
    choice = [[S for S in range(full + 1)]]
    for _ in range(1, min(k, T)):  # more blocks than tasks never help
        prev, cur, pick = f[-1], f[-1][:], choice[-1][:]
        for S in range(1, full + 1):
            low = S & -S
            rest = S & ~low
            sub = rest
            while True:  # blocks B containing S's lowest task
                B = low | sub
                if B != S:
                    total = best_total[B] + prev[S & ~B]
                    if total > cur[S] + 1e-15:
                        cur[S], pick[S] = total, B
                if sub == 0:
                    break
                sub = (sub - 1) & rest
        f.append(cur)
        choice.append(pick)
    blocks, S, m = [], full, len(f) - 1
    while S:
        B = choice[m][S]
        blocks.append(B)
        S &= ~B
        m = max(m - 1, 0)
    groups, served_by = [], {}
    for B in sorted(blocks, key=lambda b: _bits(b, T)):
        G = best_group[B]
        members = [tasks[j] for j in _bits(G, T)]
        if members not in groups:
            groups.append(members)
        for j in _bits(B, T):
            served_by[tasks[j]] = groups.index(members)
    return Grouping(k, groups, {t: served_by[t] for t in tasks}, f[-1][full] / T)


def groupings_for_budgets(affinity: Tensor, tasks: Sequence[str], overlap: bool = True) -> list[Grouping]:
    """:func:`select_groups` for every budget ``k = 1 .. T``."""
    return [select_groups(affinity, tasks, k, overlap) for k in range(1, len(tasks) + 1)]
