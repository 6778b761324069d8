"""tools/task_affinity.py and tools/task_groups.py on the tiny experiment (run in the test's process:
``run_tool``); the affinity under torchrun equals one process on the same global batches."""

from __future__ import annotations

import json

import pytest
import torch

from mtvision.relations import groupings_for_budgets

from ..engine.helpers import write_tiny_config
from ..multiprocess import ROOT, run_tool, torchrun

pytestmark = pytest.mark.slow

# GroupNorm: no batch statistics, so two processes of half batches compute what one process does
GROUPNORM = ["model.backbone.timm_kwargs={norm_layer: groupnorm1}"]


def test_task_affinity_writes_the_matrices_groupings_and_pictures(tmp_path, capsys):
    cfg = write_tiny_config(tmp_path)
    assert run_tool("task_affinity.py", cfg, "--out", tmp_path / "aff", "--iters", 4, "--every", 2,
                    "--no-progress") == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "aff" / "affinity.json").read_text())
    assert result["tasks"] == ["seg", "depth", "normal"]
    assert result["affinity_measurements"] == 2 and result["gradient_measurements"] == 2
    for key in ("affinity", "cosine", "conflict_fraction"):
        assert len(result[key]) == 3 and all(len(row) == 3 for row in result[key]), key
    assert sorted(result["groupings"]) == ["1", "2", "3"]
    assert result["groupings"]["1"]["groups"] == [["seg", "depth", "normal"]]
    for name in ("affinity.png", "cosine.png"):
        assert (tmp_path / "aff" / name).stat().st_size > 1000
    assert "lookahead affinity" in out and "k=2:" in out
    # a second call into the same folder would replace those results: refused, nothing touched
    before = (tmp_path / "aff" / "affinity.json").read_bytes()
    assert run_tool("task_affinity.py", cfg, "--out", tmp_path / "aff", "--iters", 4, "--every", 2) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err, err[-2000:]
    assert (tmp_path / "aff" / "affinity.json").read_bytes() == before


def test_task_groups_trains_every_group_and_ranks_the_groupings(tmp_path, capsys, monkeypatch):
    cfg = write_tiny_config(tmp_path)
    over = ["data.tasks=[seg,depth]", "model.heads={seg: {name: segmentation, num_classes: 6, channels: 16}, "
            "depth: {name: depth, channels: 16}}", "train.max_iters=1", "train.eval_interval=1"]
    # an affinity.json as tools/task_affinity.py writes it: depth's step helps seg, seg's hurts depth,
    # so TAG serves seg from {seg, depth} and depth alone (an overlapping grouping, not a partition)
    A = torch.tensor([[0.01, -0.02], [0.03, 0.01]], dtype=torch.float64)
    (tmp_path / "aff").mkdir()
    (tmp_path / "aff" / "affinity.json").write_text(json.dumps({
        "tasks": ["seg", "depth"], "affinity": A.tolist(),
        "groupings": {str(g.k): g.as_dict() for g in groupings_for_budgets(A, ["seg", "depth"])}}))
    # the tool trains each group with tools/train.py in a subprocess, which inherits this environment
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert run_tool("task_groups.py", cfg, *over, "--out", tmp_path / "groups", "--k", 2,
                    "--affinity", tmp_path / "aff" / "affinity.json") == 0
    out = capsys.readouterr().out
    for run in ("seg", "depth", "seg+depth"):
        assert (tmp_path / "groups" / "seed0" / run / "metrics.json").is_file(), run
    result = json.loads((tmp_path / "groups" / "groupings.json").read_text())
    groupings = [r["groups"] for r in result["groupings"]]
    assert [["seg"], ["depth"]] in groupings and [["seg", "depth"]] in groupings  # both partitions
    # the two single-task models are the baselines: that grouping's Δm is 0 by definition
    (singles,) = [r for r in result["groupings"] if r["groups"] == [["seg"], ["depth"]]]
    assert singles["delta_m"] == pytest.approx(0.0, abs=1e-12)
    (predicted,) = [r for r in result["groupings"] if r["predicted"]]  # TAG's pick
    assert predicted["groups"] == [["seg", "depth"], ["depth"]]
    assert predicted["tag_score"] == pytest.approx(0.015)
    assert result["groupings"] == sorted(result["groupings"], key=lambda r: r["delta_m"])
    assert all("tag_score" in r for r in result["groupings"])
    assert -1.0 <= result["spearman_tag_score_vs_delta_m"] <= 1.0 and "Spearman" in out
    assert "← predicted" in out


@pytest.mark.distributed
def test_affinity_under_torchrun_equals_one_process(tmp_path):
    cfg = write_tiny_config(tmp_path)
    args = ["--iters", "3", "--every", "1", "--no-progress", *GROUPNORM, "optimizer.name=sgd"]
    assert run_tool("task_affinity.py", cfg, "--out", tmp_path / "one", *args) == 0
    torchrun(2, "task_affinity.py", str(cfg), "--out", str(tmp_path / "two"), *args)
    one = json.loads((tmp_path / "one" / "affinity.json").read_text())
    two = json.loads((tmp_path / "two" / "affinity.json").read_text())
    assert one["affinity_measurements"] == two["affinity_measurements"] == 3
    for key in ("affinity", "cosine"):
        for a, b in zip(one[key], two[key]):
            assert b == pytest.approx(a, rel=1e-4, abs=1e-7), key
