"""tools/train.py as a command: --help, the guard against writing over a trained run, the resume hint after a
signal, and user errors (also from DataLoader workers) as one ``error:`` line with exit status 2."""

import os
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest
import yaml

from mtvision.data.dense_io import read_depth
from mtvision.data.io import DataError
from mtvision.engine.checkpoint import load_checkpoint

from .data import fixtures as F
from .engine.helpers import TINY, wait_for_file, write_tiny_config
from .test_tools import ROOT, _tool

ONE_ITER = ["--no-progress", "train.max_iters=1", "train.eval_interval=1"]


def test_help_says_what_it_writes_the_flags_and_the_exit_statuses(capsys):
    with pytest.raises(SystemExit) as e:
        _tool("train").main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for words in ("config.yaml", "train.log", "checkpoints/last.pth", "best.pth", "metrics.json",
                  "--resume PATH", "--overwrite", "Exit status", "0  training done, or stopped by a signal",
                  "1  training failed", "2  user error", "torchrun --nproc_per_node=4 tools/train.py",
                  "python tools/train.py WORK_DIR/config.yaml --resume"):
        assert words in text, words


def test_a_trained_work_dir_is_not_written_over(tmp_path, capsys, monkeypatch):
    train = _tool("train")
    config = write_tiny_config(tmp_path)
    assert train.main([str(config), *ONE_ITER]) == 0
    work = tmp_path / "work"
    last, best = work / "checkpoints" / "last.pth", work / "checkpoints" / "best.pth"
    kept = [last, best, work / "metrics.json", work / "config.yaml", work / "train.log"]
    before = {p: p.read_bytes() for p in kept}
    capsys.readouterr()

    assert train.main([str(config), "--no-progress", "train.max_iters=2"]) == 2
    assert capsys.readouterr().err == (f"error: {work} already holds checkpoints of a run (iteration 1); "
                                       f"continue it with --resume, or start again with --overwrite "
                                       f"(deletes them)\n")
    assert {p: p.read_bytes() for p in kept} == before  # nothing written, not even config.yaml or the log
    # every torchrun process decides alike from the files; one line per node
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert train.main([str(config), "--no-progress"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("LOCAL_RANK")
    last.unlink()  # best.pth alone is a trained model too
    assert train.main([str(config), "--no-progress"]) == 2
    assert "already holds checkpoints of a run (iteration 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train.main([str(config), "--resume", "--overwrite"])
    assert e.value.code == 2

    assert train.main([str(config), "--no-progress", "train.max_iters=2", "train.eval_interval=2",
                       "--overwrite"]) == 0
    assert f"--overwrite: deleted the previous run (iteration 1) from {work}" in capsys.readouterr().out
    assert load_checkpoint(last)["iteration"] == 2 and load_checkpoint(best)["iteration"] == 2


@pytest.mark.slow
def test_the_resume_hint_after_a_signal_resumes_the_run(tmp_path):
    config = write_tiny_config(tmp_path)
    work = tmp_path / "work"
    # the overrides live only in work/config.yaml: the hint must point there, not at CONFIG
    cmd = [sys.executable, "tools/train.py", str(config), "--no-progress", "train.max_iters=400",
           "train.checkpoint_interval=2", "train.eval_interval=1000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    last = work / "checkpoints" / "last.pth"
    wait_for_file(last, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped_at = load_checkpoint(last)["iteration"]
    hint = out.strip().splitlines()[-1]
    prefix = f"stopped by SIGTERM at iteration {stopped_at}; continue with: "
    assert hint == f"{prefix}python tools/train.py {work / 'config.yaml'} --resume"

    words = shlex.split(hint.removeprefix(prefix))
    assert words[:2] == ["python", "tools/train.py"]
    # the hinted command, stopping two iterations later instead of at 400
    assert _tool("train").main([*words[2:], "--no-progress", f"train.max_iters={stopped_at + 2}"]) == 0
    assert load_checkpoint(last)["iteration"] == stopped_at + 2
    assert f"resumed from {last}" in (work / "train.log").read_text()


def _custom_run(tmp_path, num_workers: int):
    """A tiny config training on a custom folder dataset (4 training, 2 validation images), read only by
    the loaders (no pre-flight read of every sample)."""
    root = tmp_path / "data"
    F.write_custom(root, "train", stems=("a", "b", "c", "d"))
    F.write_custom(root, "val", stems=("a", "b"))
    raw = {**TINY, "work_dir": str(tmp_path / "work")}
    raw["data"] = {**TINY["data"], "dataset": "custom", "root": str(root), "num_classes": 4, "batch_size": 2,
                   "num_workers": num_workers, "check": False}
    seg = {"name": "segmentation", "num_classes": 4, "channels": 16}
    raw["model"] = {**TINY["model"], "heads": {**TINY["model"]["heads"], "seg": seg}}
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, root


@pytest.mark.slow
def test_a_data_error_in_a_loader_worker_is_one_error_line(tmp_path):
    config, root = _custom_run(tmp_path, num_workers=2)
    corrupt = root / "train" / "images" / "c.png"
    corrupt.write_bytes(b"not a png")
    proc = subprocess.run([sys.executable, "tools/train.py", str(config), "--no-progress",
                           "train.max_iters=2", "train.eval_interval=2"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    # the log lines of the run, then the DataError's own message without the worker's wrapper
    assert lines[-1] == f"error: {corrupt}: image: cannot decode the image (corrupt or not an image file)"
    assert [x for x in lines if x.startswith("error")] == [lines[-1]]
    assert "Traceback" not in proc.stderr and "Caught DataError" not in proc.stderr


def test_an_8_bit_depth_png_is_refused(tmp_path, capsys):
    config, root = _custom_run(tmp_path, num_workers=0)
    depth = root / "train" / "depth" / "b.png"
    F.write_gray_png(depth, np.full((5, 7), 200, np.uint8))
    with pytest.raises(DataError, match="16-bit millimetres") as e:
        read_depth(depth)
    assert e.value.path == str(depth) and e.value.field == "depth"
    argv = [str(config), "--no-progress", "train.max_iters=2", "train.eval_interval=2"]
    assert _tool("train").main(argv) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {depth}: depth: 8-bit PNG, which holds at most 0.255 m: depth PNGs must be 16-bit "
        f"millimetres (metres * depth_scale 1000, 0 = invalid); write np.uint16, or an .npy of float metres")
    # the pre-flight read of every sample names it the same way
    assert _tool("train").main([*argv, "data.check=true"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: ") and f"{depth}: depth: 8-bit PNG, which holds at most 0.255 m" in err
