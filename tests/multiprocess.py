"""Multi-process tests on the CPU: worker functions in 2 gloo processes (torch.multiprocessing), and
scripts under ``torchrun`` (``python -m torch.distributed.run``, gloo, c10d rendezvous)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
# one thread per process (the machine's cores are shared by the processes), the checkout importable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, script: str | Path, *args, extra=(), timeout: float = 300, wait: bool = True):
    """``script`` (a file name in ``tools/``, or an absolute path) with ``args`` in ``nproc`` processes
    under torchrun; ``extra``: more torchrun options (e.g. ``--max-restarts=1``). With ``wait`` the
    finished ``subprocess.CompletedProcess`` (the test fails unless it exited with 0, showing the ends
    of its output), else the running ``subprocess.Popen`` (text pipes for stdout and stderr)."""
    # c10d rendezvous (as on a cluster): a restart after a failed worker re-rendezvouses cleanly
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", *extra,
           str(ROOT / "tools" / script), *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def run_tool(script: str, *args) -> int:
    """``tools/<script>`` (e.g. ``train.py``) run in this process: ``main(args)``, with one torch thread
    as the processes above have (``ENV``); returns its exit status. For the one-process reference runs
    next to :func:`torchrun`: the same code as ``python tools/<script>`` without starting an interpreter
    and importing torch again (3-5 s each on 2 cores)."""
    path = ROOT / "tools" / script
    spec = importlib.util.spec_from_file_location(f"mtv_tool_{path.stem}_in_process", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return module.main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


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
