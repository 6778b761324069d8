"""Every YAML under configs/ loads, validates, and names a buildable balancer and consistent tasks."""

from pathlib import Path

import pytest

from mtvision.balancing import BALANCERS
from mtvision.config import load_config
from mtvision.engine import check_tasks

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
BASES = {"base.yaml"}  # partial files meant to be included, not run


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name not in BASES], ids=lambda p: p.stem)
def test_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert check_tasks(cfg)
    assert cfg.balancer.name in BALANCERS


def test_one_config_per_balancing_method():
    names = {p.stem for p in CONFIGS if p.parent.name == "balancing"}
    assert set(BALANCERS) <= names
    assert {"mgda_rep", "pcgrad_rep", "upgrad_rep"} <= names
