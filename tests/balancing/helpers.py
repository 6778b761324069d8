"""Shared by the balancing tests."""

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class NoHostRead(TorchDispatchMode):
    """Fails on any read of a tensor value by the host (.item(), bool(tensor), a tensor index): what
    would synchronise with an accelerator."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
                    torch.ops.aten.is_nonzero.default):
            raise AssertionError(f"host read of a tensor value: {func}")
        return func(*args, **(kwargs or {}))


def make_jacobian(kind: str, T: int, P: int = 40, seed: int = 0, kinds: tuple[str, ...] = ()) -> torch.Tensor:
    """[T,P] float64 task gradients of a given structure: random, conflicting (every other task roughly
    opposes the previous one), aligned, identical, duplicated (last = first), zero (one task), opposed (an
    exactly opposed pair of different norms), scales (norms from 1e-4 to 1e4). The random draws depend
    on ``kind``'s place in ``kinds`` (each test file's own list, so its cases stay what they were)."""
    rng = np.random.default_rng(seed + 1000 * T + 7 * kinds.index(kind))
    J = rng.standard_normal((T, P)) * rng.uniform(0.1, 10.0, size=(T, 1))
    if kind == "conflicting":
        for i in range(1, T, 2):
            J[i] = -rng.uniform(0.5, 2.0) * J[i - 1] + 0.3 * rng.standard_normal(P)
    elif kind == "aligned":
        J = 3.0 * rng.standard_normal(P) + 0.2 * J / np.linalg.norm(J, axis=1, keepdims=True)
    elif kind == "identical":
        J[:] = J[0]
    elif kind == "duplicated":
        J[T - 1] = J[0]
    elif kind == "zero":
        J[T // 2] = 0.0
    elif kind == "opposed":
        J[1] = -2.5 * J[0]
    elif kind == "scales":
        J = J / np.linalg.norm(J, axis=1, keepdims=True) * 10.0 ** np.linspace(-4, 4, T)[:, None]
    return torch.tensor(J, dtype=torch.float64)


def gram(J: torch.Tensor) -> torch.Tensor:
    """The Gramian of ``J`` [T,P]."""
    return J @ J.T


def cases(sizes, kinds):
    """pytest parameters (kind, T) for every size and kind."""
    import pytest

    return [pytest.param(k, T, id=f"{k}-T{T}") for T in sizes for k in kinds]
