"""Two-process tests on the CPU: a test's worker function runs in 2 gloo processes (torch.multiprocessing)."""

from __future__ import annotations

import contextlib
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@contextlib.contextmanager
def gloo_process_group(rank: int, init_file: str, world_size: int = 2):
    """The process group of a worker started by :func:`run_two_processes` (one thread per process)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_two_processes(worker, tmp_path, timeout: float = 120.0) -> None:
    """``worker(rank, init_file, out_dir)`` (a module-level function) in 2 processes, ``out_dir`` being
    ``tmp_path``; the test fails when they do not finish within ``timeout`` seconds."""
    ctx = mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"distributed workers did not finish in {timeout:.0f} s")
