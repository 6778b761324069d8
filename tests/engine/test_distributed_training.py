"""tools/train.py and tools/eval.py under torchrun (2 processes, gloo, CPU) against one process (run in
the test's process: ``run_tool``), and a torchrun restart after a killed worker resuming exactly."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from ..multiprocess import run_tool
from ..multiprocess import torchrun as _torchrun
from .helpers import TINY, wait_for_file

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _config(tmp_path: Path, name: str, det: bool = False, **train) -> Path:
    """The tiny experiment with GroupNorm in the backbone (no batch-dependent layer), plain SGD; ``det``:
    with a detection task (FCOS head) next to the dense ones."""
    raw = yaml.safe_load(yaml.safe_dump(TINY))
    raw["work_dir"] = str(tmp_path / name)
    if det:
        raw["data"]["tasks"].append("det")
        raw["model"]["heads"]["det"] = {"name": "fcos", "num_classes": 6, "channels": 16, "num_convs": 1}
    raw["model"]["backbone"]["timm_kwargs"] = {"norm_layer": "groupnorm1"}
    raw["data"].update(num_train=16, num_val=5)  # 5 validation scenes: an uneven split over 2 processes
    raw["optimizer"] = {"name": "sgd", "lr": 0.01, "momentum": 0.9}
    raw["train"].update({"max_iters": 3, "eval_interval": 3, "checkpoint_interval": 3, **train})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _one_process(script: str, *args) -> None:
    """The one-process reference: ``tools/<script>`` in this process (``run_tool``)."""
    assert run_tool(script, *args) == 0


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


# sdmgrad: three batches a step, each split over the processes; stch: a loss weighting with state that
# passes its warm-up, nadir and Tchebycheff phases in the three steps
@pytest.mark.parametrize("method,det", [("ew", False), ("pcgrad", False), ("pcgrad", True),
                                        ("sdmgrad", False), ("stch", False)])
def test_two_processes_train_like_one_on_the_same_global_batches(tmp_path, method, det):
    one = _config(tmp_path, "one", det)
    two = _config(tmp_path, "two", det)
    over = [f"balancer.name={method}"]
    if method == "stch":
        over += ["balancer.kwargs.warmup_iters=1", "balancer.kwargs.nadir_iters=1"]
    _one_process("train.py", str(one), "--no-progress", *over)
    out = _torchrun(2, "train.py", str(two), "--no-progress", *over)
    assert out.stdout.count("work dir:") == 1  # rank 0 alone reports and writes
    a = _weights(tmp_path / "one" / "checkpoints" / "last.pth")
    b = _weights(tmp_path / "two" / "checkpoints" / "last.pth")
    # Equal up to float summation order (per-process means averaged vs one mean over the global batch),
    # which the steps then amplify: measured max |diff| 1e-7 after 1 step, 7e-7 after 2, 9e-6 after 4,
    # while 3 steps move the weights by ~1e-2.
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 2e-5, worst
    log = (tmp_path / "two" / "train.log").read_text()
    assert "distributed: 2 processes (gloo), 2 samples per process and step" in log
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["iteration"] == 3


def test_evaluation_identical_with_one_and_two_processes(tmp_path):
    cfg = _config(tmp_path, "ev", det=True, max_iters=2, eval_interval=2, checkpoint_interval=2)
    _one_process("train.py", str(cfg), "--no-progress")
    ckpt = tmp_path / "ev" / "checkpoints" / "last.pth"
    _one_process("eval.py", str(cfg), "--checkpoint", str(ckpt), "--out", str(tmp_path / "m1.json"))
    out = _torchrun(2, "eval.py", str(cfg), "--checkpoint", str(ckpt), "--out", str(tmp_path / "m2.json"))
    assert out.stdout.count("wrote") == 1
    m1 = json.loads((tmp_path / "m1.json").read_text())["metrics"]
    m2 = json.loads((tmp_path / "m2.json").read_text())["metrics"]
    assert m1.keys() == m2.keys() and "det/AP" in m1
    for k in m1:  # confusion matrices are integers; the float64 sums differ at most in the last bits
        if m1[k] is None:  # NaN (e.g. an AP of a class absent from the 5 scenes) is written as null
            assert m2[k] is None, k
        else:
            assert m1[k] == pytest.approx(m2[k], rel=1e-12, abs=1e-12, nan_ok=True), k


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_killed_worker_is_restarted_by_torchrun_and_resumes_exactly(tmp_path):
    train = dict(max_iters=24, eval_interval=1000, checkpoint_interval=4, log_interval=4)
    straight = _config(tmp_path, "straight", **train)
    _torchrun(2, "train.py", str(straight), "--no-progress")

    cfg = _config(tmp_path, "killed", **train)
    proc = _torchrun(2, "train.py", str(cfg), "--no-progress", "--resume", extra=["--max-restarts=1"],
                     wait=False)
    ckpt = tmp_path / "killed" / "checkpoints" / "last.pth"
    wait_for_file(ckpt, proc)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGKILL)  # one worker dies without a word
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:] + err[-5000:]
    log = (tmp_path / "killed" / "train.log").read_text()
    assert "resumed from" in log, log[-3000:]
    a = _weights(tmp_path / "straight" / "checkpoints" / "last.pth")
    b = _weights(ckpt)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigterm_to_torchrun_stops_every_worker_after_the_same_step_and_saves(tmp_path):
    cfg = _config(tmp_path, "term", max_iters=2000, eval_interval=10000, checkpoint_interval=2)
    proc = _torchrun(2, "train.py", str(cfg), "--no-progress", wait=False)
    ckpt = tmp_path / "term" / "checkpoints" / "last.pth"
    wait_for_file(ckpt, proc)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to the workers (and reports it itself)
    proc.communicate(timeout=120)
    log = (tmp_path / "term" / "train.log").read_text()
    (line,) = [x for x in log.splitlines() if "stopped by SIGTERM" in x]
    stopped_at = torch.load(ckpt, weights_only=True)["iteration"]
    assert f"at iteration {stopped_at};" in line and stopped_at < 2000


def test_official_coco_export_identical_with_one_and_two_processes(tmp_path):
    """--coco-export under torchrun: every process's detections are gathered, so the results file and
    the official numbers equal one process's."""
    from ..data.test_coco import write_coco
    from ..evaluation.test_coco_export import _clean_doc

    root = tmp_path / "coco"
    for split in ("train", "val"):
        write_coco(root, split, doc=_clean_doc())
    cfg = _config(tmp_path, "co", max_iters=2, eval_interval=2, checkpoint_interval=2)
    overrides = ["data.dataset=coco", f"data.root={root}", "data.num_classes=3", "data.tasks=[det]",
                 "data.batch_size=2", "data.size=[64,64]",
                 "model.heads={det: {name: fcos, num_classes: 3, channels: 16, num_convs: 1}}"]
    _one_process("train.py", str(cfg), "--no-progress", *overrides)
    ckpt = tmp_path / "co" / "checkpoints" / "last.pth"
    runs = {}
    for n in (1, 2):
        # one image per process and batch in both runs (data.batch_size is the global batch): the
        # convolutions then compute every image alike and the scores are equal to the last bit
        args = [str(cfg), "--checkpoint", str(ckpt), "--coco-export", str(tmp_path / f"r{n}.json"),
                "--out", str(tmp_path / f"m{n}.json"), *overrides, f"data.batch_size={n}"]
        _one_process("eval.py", *args) if n == 1 else _torchrun(2, "eval.py", *args)
        runs[n] = (json.loads((tmp_path / f"r{n}.json").read_text()),
                   json.loads((tmp_path / f"m{n}.json").read_text())["coco_official"])
    key = lambda r: (r["image_id"], r["category_id"], r["score"], r["bbox"])  # noqa: E731
    assert len(runs[1][0]) > 0 and sorted(runs[1][0], key=key) == sorted(runs[2][0], key=key)
    assert runs[1][1] == runs[2][1]  # the official numbers (NaN written as null)
