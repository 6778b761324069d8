"""torchrun --nproc_per_node=2 (gloo, CPU): every architecture's step under DDP equals one process."""

from pathlib import Path

import pytest

from ..multiprocess import torchrun

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SCRIPT = Path(__file__).with_name("ddp_arch_check.py")
ARCHS = ["soft_sharing", "cross_stitch", "mtan", "padnet"]


def test_two_processes_equal_one_for_every_architecture():
    out = torchrun(2, SCRIPT, *ARCHS)  # one process group for all: torchrun starts once
    for arch in ARCHS:
        assert f"DDP {arch}: ew and pcgrad" in out.stdout
