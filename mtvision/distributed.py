"""torch.distributed plumbing, the one place engine, balancing, losses and evaluation ask about processes.

Training is launched by ``torchrun`` (no home-made launcher).

``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them and starts the default process group (NCCL with one GPU per process,
gloo on CPU). A plain ``python tools/train.py`` run has none of them and stays a single process, so the
same command and config work from one CPU to many nodes.
"""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "init_distributed", "close_process_group", "dist_env", "dist_ready", "world_size",
           "all_reduce_sum",
           "mean_over_processes", "all_gather_objects", "broadcast_parameters", "broadcast_buffers"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_ready() -> bool:
    """True when torch.distributed is available, initialised and has more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of processes of the default group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def dist_env() -> DistEnv:
    """The current process group's view (a single process when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistEnv()


def init_distributed(device_type: str, timeout_minutes: float = 30.0) -> DistEnv:
    """Start the default process group when launched by torchrun with ``WORLD_SIZE > 1``.

    ``device_type`` is ``"cuda"`` (NCCL; this process takes GPU ``LOCAL_RANK``) or ``"cpu"`` (gloo).
    Idempotent: returns the existing group's view if one is already initialised.
    """
    if dist.is_available() and dist.is_initialized():
        return dist_env()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return DistEnv()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if device_type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    # After torchrun restarts the workers (--max-restarts), the rendezvous store can still hold the
    # previous round's keys (e.g. gloo's peer addresses), and a new worker that reads one connects to a
    # dead process. A per-restart prefix keeps each round to its own keys.
    store = dist.PrefixStore(f"mtvision/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout, "store": store, "rank": rank,
                              "world_size": world_size}
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(**kwargs)
    return dist_env()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` for a single process."""
    env = dist_env()
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every process (what DDP does at construction), for
    models trained without the DDP wrapper (gradient-balancing methods reduce gradients themselves)."""
    _broadcast([*module.parameters(), *module.buffers()], src)


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every process, so that what is
    evaluated and saved is the same model on every process: each process updates its running
    statistics from its own local batches, and DDP only re-broadcasts them at the next forward."""
    _broadcast(list(module.buffers()), src)


def _broadcast(tensors: Sequence[torch.Tensor], src: int) -> None:
    """Broadcast ``tensors`` in place from ``src``: one collective per dtype and device (a ResNet-50 has
    ~160 BatchNorm buffers), not one per tensor."""
    if not dist_ready():
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    with torch.no_grad():
        for (_, device), group in sorted(groups.items(), key=lambda kv: str(kv[0])):  # same order everywhere
            flat = torch.cat([t.detach().reshape(-1) for t in group]).to(_comm_device(device))
            dist.broadcast(flat, src)
            for t, part in zip(group, torch.split(flat, [t.numel() for t in group])):
                t.data.copy_(part.view_as(t))


def close_process_group() -> None:
    """End this process's part of the default process group, if one was started: first the objects
    that hold it and are only freed by the garbage collector (a trainer and its hooks form a reference
    cycle, and the trainer holds DDP's reducer, which holds the group), so that the group is destroyed
    here, while everything is alive, and not during interpreter shutdown, when its threads can no longer
    take the GIL (seen: a worker aborting with "terminate called without an active exception" after a
    finished run). The caller drops its own references first."""
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_processes(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` averaged over every process (``t`` itself with a single process)."""
    if not dist_ready():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t.div_(dist.get_world_size())


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
    each input's own device. (Metrics keep only additive state, so the whole-set result is a function
    of the sum of every process's state.)
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
