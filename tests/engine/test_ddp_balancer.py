"""torchrun --nproc_per_node=2 (gloo, CPU): gradient balancing under DDP equals one process."""

from pathlib import Path

import pytest

from ..multiprocess import torchrun

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SCRIPT = Path(__file__).with_name("ddp_balancer_check.py")


@pytest.mark.parametrize("method,level", [("mgda", "param"), ("pcgrad", "param"), ("upgrad", "rep")])
def test_two_processes_equal_one(method, level):
    out = torchrun(2, SCRIPT, method, level)
    assert f"DDP {method} {level}: weights" in out.stdout
