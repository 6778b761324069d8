"""Preemption and failure end to end, through ``tools/train.py`` in subprocesses: a SIGTERM to the whole
process group (DataLoader workers included) and to the torchrun launcher stops after a step with
``last.pth`` saved and resumable; a run that fails after it started leaves ``last.pth`` and a one-line
cause; under torchrun with BatchNorm and a gradient method, the metrics logged at the end of training
are the ones ``tools/eval.py`` computes from the saved checkpoint.

Every test here failed on the engine before its rewrite (commit 04df1ed); each docstring says how.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ..multiprocess import run_tool, torchrun
from .helpers import TINY

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TRAIN = ROOT / "tools" / "train.py"


def _config(tmp_path: Path, name: str, data=None, model_heads=None, top=None, **train) -> Path:
    """The tiny experiment (``helpers.TINY``) with ``work_dir`` ``tmp_path/name``, written as YAML."""
    raw = yaml.safe_load(yaml.safe_dump(TINY))
    raw["work_dir"] = str(tmp_path / name)
    raw["data"].update(data or {})
    raw["model"]["heads"].update(model_heads or {})
    raw["train"].update(train)
    raw.update(top or {})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children first), from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill_tree(proc: subprocess.Popen, extra=()) -> None:
    """SIGKILL ``proc``, everything below it and the pids in ``extra`` (cleanup after a failed test)."""
    for pid in [*_descendants(proc.pid), *extra, proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _wait_for_log(log: Path, text: str, proc: subprocess.Popen, timeout: float = 180.0,
                  output=lambda: "") -> None:
    """Poll ``log`` until it contains ``text``, while ``proc`` runs."""
    t0 = time.monotonic()
    while not (log.is_file() and text in log.read_text()):
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before {text!r} appeared in {log}:\n{output()}")
        if time.monotonic() - t0 > timeout:
            _kill_tree(proc)
            pytest.fail(f"{text!r} never appeared in {log}")
        time.sleep(0.05)


def _python(*args, env=ENV, timeout: float = 180.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _python_stack(pid: int) -> str:
    """Where process ``pid``'s Python threads are (py-spy, when the venv has it), for a hang's report."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return ""
    return subprocess.run([str(spy), "dump", "--pid", str(pid)], check=False, capture_output=True,
                          text=True, timeout=60).stdout


def _signal_training_with_workers(tmp_path, name: str, send) -> tuple[int, Path, str, str, list[int]]:
    """Start ``tools/train.py`` (a new session, 2 DataLoader workers, 200 iterations), wait until it
    trains, ``send(main_pid, worker_pids)`` a signal, and wait up to 60 s for it to exit (a hang fails
    with the Python stack). Returns ``(exit status, work dir, stdout, stderr, worker pids)``."""
    cfg = _config(tmp_path, name, data={"num_workers": 2}, max_iters=200, eval_interval=1000,
                  checkpoint_interval=1000, log_interval=1)
    work = tmp_path / name
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, str(TRAIN), str(cfg), "--no-progress"], cwd=ROOT, env=ENV,
                                stdout=out, stderr=err, start_new_session=True)
    workers: list[int] = []
    try:
        _wait_for_log(work / "train.log", "iter 2/200", proc, output=err_path.read_text)
        workers = _descendants(proc.pid)
        assert len(workers) == 2, workers  # the two DataLoader workers, started by now
        send(proc.pid, workers)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            saved = (work / "checkpoints" / "last.pth").exists()
            pytest.fail("train.py did not exit within 60 s of the signal; last.pth "
                        f"{'saved' if saved else 'not saved'}\n{_python_stack(proc.pid)}\n"
                        f"{err_path.read_text()[-3000:]}")
    finally:
        if proc.poll() is None:
            _kill_tree(proc, workers)
    return rc, work, out_path.read_text(), err_path.read_text(), workers


def test_sigterm_to_the_process_group_with_dataloader_workers_saves_exits_0_and_resumes(tmp_path):
    """``setsid tools/train.py`` with 2 DataLoader workers, then SIGTERM to the whole process group (a
    terminal's or ``kill -- -PGID``): the main process finishes its step, saves ``last.pth`` (the only
    one: no periodic checkpoint is due), prints how to resume and exits 0 without a traceback; its workers
    are gone after it; ``--resume`` then continues from the saved iteration to the end.

    Before the rewrite the workers died of the signal under the main process ("DataLoader worker
    (pid N) is killed by signal: Terminated" raised in the next ``next(batches)``): a traceback, exit
    status 1, no ``last.pth``. With the rewrite as first committed (04df1ed: workers ignoring SIGTERM),
    the stop was saved but the process never exited: at interpreter exit ``multiprocessing`` terminates
    its daemonic children with SIGTERM, which they ignored, and then joins them forever (the same hang
    ended every ``data.num_workers > 0`` run, signal or not). Now the workers leave the process group and
    ignore SIGTERM, and the trainer ends them through their queues."""
    # pgid == pid (a new session): the group, workers included
    rc, work, stdout, stderr, workers = _signal_training_with_workers(
        tmp_path, "grp", lambda pid, workers: os.killpg(pid, signal.SIGTERM))
    ckpt = work / "checkpoints" / "last.pth"
    assert rc == 0, stdout[-2000:] + stderr[-5000:]
    assert "Traceback" not in stderr and "DataLoader worker" not in stderr, stderr[-5000:]
    stopped_at = torch.load(ckpt, weights_only=True)["iteration"]
    assert 2 <= stopped_at < 200
    hint = f"python tools/train.py {work / 'config.yaml'} --resume"
    assert f"stopped by SIGTERM at iteration {stopped_at}; continue with: {hint}" in stdout, stdout
    assert f"stopped by SIGTERM at iteration {stopped_at}; saved checkpoints/last.pth" in stderr
    assert hint in stderr
    assert not (work / "metrics.json").exists()  # written only when the schedule completes
    # the workers went with their main process (the loader shut them down, none left orphaned)
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), [w for w in workers if _alive(w)]

    # the printed command, with a shorter schedule (train.max_iters may differ on resume); a process of
    # its own: a run with DataLoader workers that completes must also exit cleanly at interpreter exit
    end = stopped_at + 2
    res = _python(TRAIN, work / "config.yaml", "--resume", "--no-progress", f"train.max_iters={end}",
                  timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-5000:]
    assert "Traceback" not in res.stderr, res.stderr[-5000:]
    log = (work / "train.log").read_text()
    assert f"resumed from {ckpt} at iteration {stopped_at} " in log, log[-3000:]
    assert torch.load(ckpt, weights_only=True)["iteration"] == end
    assert json.loads((work / "metrics.json").read_text())["iteration"] == end


@pytest.mark.distributed
def test_sigterm_to_the_torchrun_launcher_with_dataloader_workers_stops_both_ranks_cleanly(tmp_path):
    """``torchrun --nproc_per_node=2 tools/train.py`` (gloo, CPU) with 2 DataLoader workers per rank, and
    SIGTERM to the launcher alone, as a cluster stops it. torchrun forwards the signal to each worker's
    whole process group (``os.killpg``: worker processes start their own session), waits up to 30 s,
    then SIGKILLs what is left. The ranks agree to stop after the same step, save ``last.pth`` once
    (with both ranks' random states: the save is collective), rank 0 prints the resume hint, and no
    worker writes a traceback or a DataLoader error; none is left for torchrun to SIGKILL.

    The launcher itself (torch 2.14) does not exit 0: its signal handler raises ``SignalException``
    out of ``torch.distributed.run.main``, so it prints that traceback and exits with status 1 whatever
    the workers did. That is torch's, so the test does not assert it; the workers' output is captured
    apart from the launcher's (``--log-dir``, ``--redirects=3``).

    Before the rewrite, ``killpg`` reached the DataLoader workers too: they died, and each rank failed
    in its next ``next(batches)`` with "DataLoader worker (pid N) is killed by signal: Terminated" (a
    traceback per rank, no ``last.pth``). As first committed (04df1ed, workers ignoring SIGTERM) both
    ranks saved, then hung at exit joining their workers until torchrun SIGKILLed them after 30 s
    ("Unable to shutdown process N via 15, forcefully exiting via 9")."""
    cfg = _config(tmp_path, "tr", data={"num_workers": 2}, max_iters=200, eval_interval=1000,
                  checkpoint_interval=1000, log_interval=1)
    work = tmp_path / "tr"
    ckpt = work / "checkpoints" / "last.pth"
    logs = tmp_path / "torchrun_logs"
    proc = torchrun(2, "train.py", str(cfg), "--no-progress", extra=[f"--log-dir={logs}", "--redirects=3"],
                    wait=False)
    try:
        _wait_for_log(work / "train.log", "iter 2/200", proc, timeout=240,
                      output=lambda: "\n".join(proc.communicate()))
        proc.send_signal(signal.SIGTERM)
        _, launcher_err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    outputs = {}
    for f in sorted(logs.rglob("*.log")):  # <log-dir>/<run id>/attempt_0/<local rank>/{stdout,stderr}.log
        outputs[(int(f.parent.name), f.stem)] = f.read_text()
    assert sorted(outputs) == [(0, "stderr"), (0, "stdout"), (1, "stderr"), (1, "stdout")], sorted(outputs)
    shown = f"launcher exit {proc.returncode}\n{launcher_err[-3000:]}\n" + "\n".join(
        f"--- rank {r} {s}:\n{text[-3000:]}" for (r, s), text in outputs.items())
    for (rank, stream), text in outputs.items():
        for bad in ("Traceback", "ConnectionResetError", "DataLoader worker", "error:"):
            assert bad not in text, f"rank {rank} {stream}: {bad}\n{shown}"
    assert "Sending process" in launcher_err and "closing signal SIGTERM" in launcher_err, shown
    assert "forcefully exiting" not in launcher_err, shown  # every worker ended within torchrun's 30 s

    state = torch.load(ckpt, weights_only=True)
    stopped_at = state["iteration"]
    assert 2 <= stopped_at < 200, shown
    assert state["data"]["world_size"] == 2 and len(state["rng"]) == 2  # both ranks took part in the save
    assert f"stopped by SIGTERM at iteration {stopped_at}; continue with: python tools/train.py" in \
        outputs[(0, "stdout")], shown
    log = (work / "train.log").read_text()
    (line,) = [x for x in log.splitlines() if "stopped by" in x]
    assert f"stopped by SIGTERM at iteration {stopped_at}; saved checkpoints/last.pth" in line, log[-3000:]
    assert not (work / "metrics.json").exists()



def test_sigterm_to_every_process_of_the_job_saves_and_exits_0(tmp_path):
    """SIGTERM to the main process and to each DataLoader worker separately, the way a stop reaches a
    job whose processes are tracked by cgroup rather than by process group (``systemctl stop`` with
    the default ``KillMode=control-group``, Slurm's ``proctrack/cgroup``, ``kill`` of every pid of a
    container): the run still finishes its step, saves, and exits 0.

    Before, the workers kept torch's SIGTERM handler and died of it; torch's SIGCHLD handler then raised
    "DataLoader worker (pid N) is killed by signal: Terminated" in the main process, which exited 1 with
    a traceback. Now the workers ignore SIGTERM/SIGINT and the trainer shuts them down through their
    queues at the end of ``train()``."""
    def each(pid, workers):
        for p in (pid, *workers):
            os.kill(p, signal.SIGTERM)

    rc, work, stdout, stderr, _ = _signal_training_with_workers(tmp_path, "each", each)
    assert rc == 0 and "Traceback" not in stderr, f"exit {rc}\n{stderr[-3000:]}"
    stopped_at = torch.load(work / "checkpoints" / "last.pth", weights_only=True)["iteration"]
    assert f"stopped by SIGTERM at iteration {stopped_at}; continue with" in stdout

CRASHY_PLUGIN = '''
"""A depth head whose 3rd training forward raises (tests/engine/test_preemption.py)."""
import torch

from mtvision.models.heads.depth import DepthHead
from mtvision.registry import HEADS


@HEADS.register("crashy_depth")
class CrashyDepthHead(DepthHead):
    training_calls = 0

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            type(self).training_calls += 1
            if type(self).training_calls == 3:
                raise RuntimeError("crashy_depth: the third training forward fails")
        return super().forward(*args, **kwargs)
'''


def test_a_run_failing_after_it_started_saves_last_pth_and_logs_the_cause(tmp_path):
    """A head (a plugin through ``custom_imports``) raises in the 3rd training step, after the first
    evaluation: the run exits 1 with the error on stderr (as of 1994309 a traceback: tools/train.py
    turns only TrainingError into one ``error:`` line), ``last.pth`` holds the 2 iterations done (no
    periodic checkpoint was due, so only the crash save can have written it), ``train.log`` names the
    cause in one line, and ``--resume`` continues from it (a new process: the head's count starts
    again, so it trains on to the end).

    Before the rewrite only a KeyboardInterrupt saved anything: any other error left no ``last.pth``
    and nothing in ``train.log`` (the traceback went to stderr only)."""
    (tmp_path / "crashy_plugin.py").write_text(CRASHY_PLUGIN)
    env = {**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    cfg = _config(tmp_path, "crash", model_heads={"depth": {"name": "crashy_depth", "channels": 16}},
                  top={"custom_imports": ["crashy_plugin"]}, max_iters=10, eval_interval=2,
                  checkpoint_interval=1000)
    work = tmp_path / "crash"
    ckpt = work / "checkpoints" / "last.pth"
    res = _python(TRAIN, cfg, "--no-progress", env=env, timeout=120)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-5000:]
    assert "RuntimeError: crashy_depth: the third training forward fails" in res.stderr
    state = torch.load(ckpt, weights_only=True)
    assert state["iteration"] == 2
    assert {"optimizer", "scheduler", "rng", "data"} <= state.keys()  # resumable
    log = (work / "train.log").read_text()
    assert "eval @ 2 " in log  # the failure came after an evaluation
    (line,) = [x for x in log.splitlines() if "run failed" in x]
    assert line.endswith(f"ERROR run failed at iteration 2 (RuntimeError: crashy_depth: the third training "
                         f"forward fails); saved {ckpt} (resume with --resume)"), line
    assert not (work / "metrics.json").exists()

    res = _python(TRAIN, work / "config.yaml", "--resume", "--no-progress", "train.max_iters=4", env=env,
                  timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-5000:]
    assert f"resumed from {ckpt} at iteration 2 " in (work / "train.log").read_text()
    assert torch.load(ckpt, weights_only=True)["iteration"] == 4


@pytest.mark.distributed
def test_batchnorm_under_torchrun_with_pcgrad_final_metrics_equal_eval_of_the_checkpoint(tmp_path):
    """2 gloo processes train the tiny BatchNorm ResNet with PCGrad (a gradient method: no DDP, so no
    buffer broadcast at each forward) for 3 steps, each rank normalising its own half of the batch, so
    their BatchNorm running statistics differ. The metrics of the final evaluation (``metrics.json``
    ``final``) must equal ``tools/eval.py`` in one process on the saved ``last.pth``: every rank
    evaluated with the running statistics that were saved (rank 0's), i.e. the model of the file.

    Before the rewrite each rank evaluated its half of the validation set with its own running
    statistics, and rank 0 saved its own: the pooled metrics belonged to no saved model and differed
    from the eval tool's."""
    cfg = _config(tmp_path, "bn", data={"num_train": 16, "num_val": 5}, max_iters=3, eval_interval=3,
                  checkpoint_interval=3)
    work = tmp_path / "bn"
    torchrun(2, "train.py", str(cfg), "--no-progress", "balancer.name=pcgrad", timeout=240)
    ckpt = work / "checkpoints" / "last.pth"
    state = torch.load(ckpt, weights_only=True)
    assert state["iteration"] == 3 and state["config"]["balancer"]["name"] == "pcgrad"
    bn = [k for k in state["model"] if k.endswith("running_mean")]
    assert bn, "the tiny backbone has no BatchNorm"
    assert all(state["model"][k.replace("running_mean", "num_batches_tracked")].item() == 3 for k in bn)
    assert any(state["model"][k].abs().max() > 0 for k in bn)  # statistics were gathered
    final = json.loads((work / "metrics.json").read_text())["final"]

    out = tmp_path / "m.json"
    assert run_tool("eval.py", work / "config.yaml", "--checkpoint", ckpt, "--out", out) == 0  # one process
    ev = json.loads(out.read_text())
    assert ev["iteration"] == 3
    metrics = ev["metrics"]
    assert final.keys() == metrics.keys() and "seg/mIoU" in final
    for k in final:
        if final[k] is None or metrics[k] is None:  # NaN is written as null
            assert final[k] is None and metrics[k] is None, (k, final[k], metrics[k])
        else:
            assert math.isclose(final[k], metrics[k], rel_tol=1e-9, abs_tol=1e-12), (k, final[k], metrics[k])
