"""torch.distributed plumbing for training launched by ``torchrun`` (no home-made launcher).

``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them and starts the default process group (NCCL with one GPU per process,
gloo on CPU). A plain ``python tools/train.py`` run has none of them and stays a single process, so the
same command and config work from one CPU to many nodes.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "init_distributed", "dist_env", "all_gather_objects", "broadcast_parameters"]


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
    if not dist_env().distributed:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src)
