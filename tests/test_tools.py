"""The command-line tools: train -> checkpoint -> eval round trip, predict pictures, ONNX export, demo,
config errors."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch

from mtvision.engine.visualize import LABEL_HEIGHT

from .engine.helpers import write_tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"mtv_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run through tools/train.py, shared by the round-trip tests."""
    tmp = tmp_path_factory.mktemp("tools")
    config = write_tiny_config(tmp)
    argv = [str(config), "--no-progress", "train.max_iters=3", "train.eval_interval=3"]
    assert _tool("train").main(argv) == 0
    return config, tmp / "work"


def test_train_eval_round_trip(trained, tmp_path, capsys):
    config, work = trained
    summary = json.loads((work / "metrics.json").read_text())
    out = tmp_path / "eval.json"
    rc = _tool("eval").main([str(config), "--checkpoint", str(work / "checkpoints" / "last.pth"),
                             "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["iteration"] == 3 and result["num_samples"] == 4
    # Same weights, same validation set: the tool reproduces the trainer's final evaluation.
    assert result["metrics"].keys() == summary["final"].keys()
    for k, v in summary["final"].items():
        if v is None:  # NaN (a class absent from the tiny set) is written as null
            assert result["metrics"][k] is None, k
        else:
            assert result["metrics"][k] == pytest.approx(v, rel=1e-6, abs=1e-6), k
    printed = capsys.readouterr().out
    assert "seg/mIoU" in printed and "normal/median" in printed


def test_predict_writes_one_png_per_image(trained, tmp_path):
    config, work = trained
    out = tmp_path / "pics"
    rc = _tool("predict").main([str(config), "--checkpoint", str(work / "checkpoints" / "best.pth"),
                                "--out", str(out), "--num", "3"])
    assert rc == 0
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["0000.png", "0001.png", "0002.png"]
    for p in pngs:
        img = cv2.imread(str(p))
        # input + (pred, true) x (seg, depth, normal) panels of 32x48 under a caption strip
        assert img.shape == (32 + LABEL_HEIGHT, 7 * 48, 3)


def test_eval_with_a_checkpoint_of_another_model_fails_cleanly(trained, tmp_path, capsys):
    config, work = trained
    rc = _tool("eval").main([str(config), "--checkpoint", str(work / "checkpoints" / "last.pth"),
                             "model.neck.out_channels=8"])
    assert rc == 2
    assert "model.neck.out_channels: the checkpoint was trained with 16" in capsys.readouterr().err
    # a checkpoint without a stored config is loaded into the config's model: the weights do not fit
    state = torch.load(work / "checkpoints" / "last.pth", weights_only=True)
    del state["config"]
    torch.save(state, tmp_path / "old.pth")
    rc = _tool("eval").main([str(config), "--checkpoint", str(tmp_path / "old.pth"),
                             "model.neck.out_channels=8"])
    assert rc == 2
    assert "does not match the model" in capsys.readouterr().err


@pytest.mark.slow
def test_export_onnx_writes_a_file_onnxruntime_agrees_with(trained, tmp_path, capsys):
    config, work = trained
    out = tmp_path / "onnx" / "tiny.onnx"
    rc = _tool("export_onnx").main([str(config), "--checkpoint", str(work / "checkpoints" / "last.pth"),
                                    "--out", str(out), "--dynamic-size"])
    assert rc == 0 and out.is_file()
    printed = capsys.readouterr().out
    assert "outputs seg, depth, normal" in printed and "input image [B, 3, H, W]" in printed
    # checked at the traced size (batch 2) and at another size
    assert "matches PyTorch at input (2, 3, 32, 48)" in printed
    assert "matches PyTorch at input (1, 3, 48, 49)" in printed


def test_export_onnx_without_the_checkpoint_fails_cleanly(trained, tmp_path, capsys):
    config, _ = trained
    rc = _tool("export_onnx").main([str(config), "--checkpoint", str(tmp_path / "missing.pth"),
                                    "--out", str(tmp_path / "m.onnx")])
    assert rc == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("override, message", [
    ("train.max_iter=5", "unknown key 'train.max_iter'"),
    ("data.batch_size=eight", "data.batch_size: expected int"),
    ("model.heads.seg.name=segmentaton", "model.heads.seg.name: unknown head 'segmentaton'"),
    ("balancer.name=pcgard", "balancer.name: unknown balancing method 'pcgard'"),
])
def test_config_errors_exit_non_zero_naming_the_key(tmp_path, capsys, override, message):
    config = write_tiny_config(tmp_path)
    assert _tool("train").main([str(config), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


@pytest.mark.slow
def test_missing_config_file_through_the_command_line(tmp_path):
    missing = tmp_path / "nope.yaml"
    proc = subprocess.run([sys.executable, "tools/train.py", str(missing)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert f"config file not found: {missing}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_prints_the_table_and_writes_pictures(tmp_path, capsys):
    config = write_tiny_config(tmp_path)
    rc = _tool("demo").main(["--config", str(config), "--pictures", "2", "--baseline-batches", "1",
                             "train.max_iters=2"])
    printed = capsys.readouterr().out
    assert rc in (0, 1)  # two iterations of a tiny model need not beat the baseline; the table must be there
    for key in ("seg/mIoU", "seg/pixAcc", "depth/abs_err", "depth/rel_err", "normal/mean", "normal/median",
                "trivial baseline", "improvement %"):
        assert key in printed
    results = json.loads((tmp_path / "work" / "demo_results.json").read_text())
    assert set(results["improvement_percent"]) == {"seg/mIoU", "seg/pixAcc", "depth/abs_err", "depth/rel_err",
                                                   "normal/mean", "normal/median"}
    assert len(list((tmp_path / "work" / "pictures").glob("*.png"))) == 2
