"""Session-wide test settings.

One intra-op thread for torch in the test process and in every process the tests start (tools under
``subprocess``, ``torchrun`` workers, ``torch.multiprocessing`` workers), unless ``OMP_NUM_THREADS`` is
set already. The tests' models are tiny (32x48 images, 16 channels): a second thread saves little, and
on a 2-core machine shared with anything else (another test process, a DataLoader worker, another job)
OpenMP's threads wait for each other at every parallel region: on a 2-core VM with another job using
about one core, tests/engine/test_balanced_training.py, tests/models/test_multitask.py and
tests/models/test_backbones.py took 516 s with 2 threads and 22 s with 1. The tests about thread counts
(the C++ ops' results across them) set their own.
"""

from __future__ import annotations

import os

THREADS = os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    import torch

    # in case torch was imported (by a plugin) before OMP_NUM_THREADS was set
    if THREADS.isdigit() and int(THREADS) > 0:
        torch.set_num_threads(int(THREADS))
