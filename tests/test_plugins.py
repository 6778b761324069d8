"""Plugins: the registries, custom_imports, and the README's plugin example (examples/my_plugin.py: a
boundary task with its own head, loss and metric, and a loss weighting) trained by tools/train.py from a
fresh process, next to seg and depth, without editing mtvision."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtvision.config import ConfigError
from mtvision.registry import BACKBONES, BALANCERS, DATASETS, HEADS, NECKS, TASKS, Registry

from .engine.helpers import write_tiny_config
from .multiprocess import run_tool

ROOT = Path(__file__).resolve().parents[1]


def test_registries_list_the_builtins_and_read_like_dicts():
    assert {"segmentation", "depth", "normals", "fcos", "deeplab_segmentation"} <= set(HEADS)
    assert list(NECKS) == ["fpn"] and "timm" in BACKBONES
    assert set(DATASETS) == {"synthetic", "nyuv2", "custom", "cityscapes", "coco"}
    assert set(TASKS) >= {"seg", "depth", "normal", "det"}
    assert {"ew", "uw", "dwa", "gradnorm", "rlw", "famo", "pcgrad", "mgda", "cagrad", "nashmtl", "imtl",
            "alignedmtl", "upgrad"} <= set(BALANCERS)
    from mtvision.models import SegmentationHead

    assert HEADS["segmentation"] is SegmentationHead and HEADS.get("nope") is None and len(NECKS) == 1


def test_register_refuses_a_taken_name_and_build_checks_kwargs():
    reg = Registry("widget")

    @reg.register("a")
    class A:
        def __init__(self, size: int, scale: float = 1.0):
            self.size, self.scale = size, scale

    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a")(type("B", (), {}))
    assert reg.build("a", "model.widget", {"size": 3}).size == 3
    with pytest.raises(ConfigError, match=r"model.widget.sise: unexpected argument for widget 'a' "
                                          r"\(accepted: size, scale\)"):
        reg.build("a", "model.widget", {"sise": 3})
    with pytest.raises(ConfigError, match=r"model.widget.size: required by widget 'a'"):
        reg.build("a", "model.widget", {})
    with pytest.raises(ConfigError, match=r"model.widget.name: unknown widget 'b' \(choose from: a\)"):
        reg.build("b", "model.widget", {})


def _plugin():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import my_plugin
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return my_plugin


def test_plugin_boundaries_and_metric_against_a_direct_computation():
    my_plugin = _plugin()
    seg = torch.tensor([[[0, 0, 1], [0, 255, 1], [2, 2, 1]]])
    edge, valid = my_plugin.boundaries(seg)
    # edge where the right or lower neighbour differs; invalid at or next to (left of / above) ignored pixels
    expected_edge = [[0, 1, 0], [1, 1, 0], [0, 1, 0]]
    expected_valid = [[1, 0, 1], [0, 0, 1], [1, 1, 1]]
    assert edge[0, 0].int().tolist() == expected_edge and valid[0, 0].int().tolist() == expected_valid
    metric = my_plugin.BoundaryF1()
    logits = torch.tensor([[[[1.0, 1.0, -1.0], [1.0, -1.0, 1.0], [-1.0, 1.0, -1.0]]]])
    metric.update(logits, edge, valid)
    # predicted at valid pixels: (0,0), (1,2), (2,1); true edges at valid pixels: (2,1) -> tp 1 of 3 and 1
    out = metric.compute()
    assert out["precision"] == pytest.approx(100 / 3) and out["recall"] == 100.0
    assert out["F1"] == pytest.approx(2 * (100 / 3) * 100 / (100 / 3 + 100))
    metric.reset()
    metric.update(edge * 2 - 1, edge, valid)  # a perfect prediction
    assert metric.compute() == {"F1": 100.0, "precision": 100.0, "recall": 100.0}


def _train(args, tmp_path):
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "examples"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), *args, "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_plugin_trains_with_custom_imports_override(tmp_path):
    """The issue's command: CONFIG custom_imports=[my_plugin], a new head and balancing method by name."""
    config = write_tiny_config(tmp_path)
    work = tmp_path / "run"
    run = _train([str(config), "custom_imports=[my_plugin]", f"work_dir={work}",
                  "data.tasks=[seg,depth,edges]",
                  "model.heads={seg: {name: segmentation, num_classes: 6, channels: 16}, "
                  "depth: {name: depth, channels: 16}, edges: {name: edge_head, channels: 8}}",
                  "balancer.name=initial_loss", "balancer.kwargs={scale: 2.0}", "train.max_iters=3",
                  "train.eval_interval=3"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((work / "metrics.json").read_text())
    assert summary["tasks"] == ["seg", "depth", "edges"]
    for key in ("seg/mIoU", "depth/abs_err", "edges/F1", "edges/precision", "edges/recall"):
        assert key in summary["final"], key
    # the plugin task's primary metric takes part in picking best.pth (its score is finite)
    assert summary["best"]["score"] is not None
    log = (work / "train.log").read_text()
    weights = re.findall(r"weights seg ([\d.]+) depth ([\d.]+) edges ([\d.]+)", log)
    assert weights, log
    # initial_loss: w_t = 2 / L_t(step 1), the same at every step
    assert len(set(weights)) == 1 and all(float(w) > 0 for w in weights[0])
    state = torch.load(work / "checkpoints" / "last.pth", weights_only=True)
    assert state["balancer"]["initial"].shape == (3,) and bool((state["balancer"]["initial"] > 0).all())


@pytest.mark.slow
def test_readme_plugin_example_is_the_tested_file_and_its_config_trains(tmp_path):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- plugin example: examples/my_plugin.py -->\n```python\n(.*?)```", readme, re.S)
    assert block, "README has no plugin example block"
    assert block.group(1) == (ROOT / "examples" / "my_plugin.py").read_text()
    work = tmp_path / "edges"
    run = _train([str(ROOT / "examples" / "edges.yaml"), f"work_dir={work}", "data.size=[32,48]",
                  "data.num_train=8", "data.num_val=4", "data.batch_size=4", "data.num_workers=0",
                  "model.backbone.name=test_resnet", "model.neck.out_channels=16", "train.max_iters=2",
                  "train.eval_interval=2", "train.device=cpu"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "edges/F1" in json.loads((work / "metrics.json").read_text())["final"]


@pytest.mark.slow
def test_missing_plugin_is_a_config_error_naming_the_key(tmp_path, capsys):
    config = write_tiny_config(tmp_path)
    # tools/train.py's main in this process: the failed import registers nothing
    assert run_tool("train.py", config, "custom_imports=[no_such_plugin_xyz]") == 2
    assert "custom_imports[0]: cannot import 'no_such_plugin_xyz'" in capsys.readouterr().err
