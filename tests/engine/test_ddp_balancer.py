"""torchrun --nproc_per_node=2 (gloo, CPU): gradient balancing under DDP equals one process."""

from pathlib import Path

import pytest

from ..multiprocess import torchrun

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SCRIPT = Path(__file__).with_name("ddp_balancer_check.py")


CHECKS = ["mgda:param", "pcgrad:param", "upgrad:rep",
          # methods with state across steps, element-wise combinations, and the K-batch ones
          "gradvac:param", "gradvac:rep", "dbmtl:param", "moco:param", "excessmtl:param", "graddrop:param",
          "graddrop:rep", "sdmgrad:param", "modo:param", "fairgrad:param", "config:param", "dualproj:rep"]


def test_two_processes_equal_one():
    out = torchrun(2, SCRIPT, *CHECKS)  # one process group for all: torchrun starts once
    for spec in CHECKS:
        method, level = spec.split(":")
        assert f"DDP {method} {level}: weights" in out.stdout
