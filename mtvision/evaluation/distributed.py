"""Summing metric state across processes under torch.distributed.

Metrics keep only additive state (confusion matrices, float64 sums, int64 counts, histograms), so the
whole-set result is a function of the SUM of every process's state: all-reducing it makes the result
independent of how the data was split into batches and processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["dist_ready", "all_reduce_sum"]


def dist_ready() -> bool:
    """True when torch.distributed is available, initialised and has more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device(device: torch.device) -> torch.device:
    # NCCL only moves CUDA tensors; a metric that never saw a batch on this rank still holds its
    # zero state on the CPU, so it is sent through the current CUDA device instead.
    if dist.get_backend() == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Return copies of ``tensors`` summed (SUM) over all processes; the inputs are never modified.

    Without an initialised process group (or with one process) the copies are returned as they are.
    Tensors of the same dtype are packed into one buffer, so there is one collective per dtype; every
    process must call this with the same shapes and dtypes in the same order. Results come back on
    each input's own device.
    """
    out = [t.detach().clone() for t in tensors]
    if not dist_ready() or not out:
        return out
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(out):
        by_dtype.setdefault(t.dtype, []).append(i)
    # Iterate dtypes in a fixed order so every rank issues the collectives identically.
    for dtype in sorted(by_dtype, key=str):
        idx = by_dtype[dtype]
        device = _comm_device(out[idx[0]].device)
        flat = torch.cat([out[i].reshape(-1).to(device) for i in idx])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for i in idx:
            n = out[i].numel()
            out[i] = flat[offset:offset + n].reshape(out[i].shape).to(out[i].device)
            offset += n
    return out
