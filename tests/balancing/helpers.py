"""Shared by the balancing tests."""

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
