"""Never lose work: exact resume, SIGTERM/SIGINT handling, non-finite steps, checkpoint contents."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtvision.engine import Trainer, load_checkpoint
from mtvision.engine.checkpoint import CheckpointError
from mtvision.engine.trainer import TrainingError

from ..multiprocess import run_tool
from .helpers import tiny_config, wait_for_file

ROOT = Path(__file__).resolve().parents[2]
# 8 training scenes / batch 4 = 2 batches per epoch: stopping after 3 steps stops mid-epoch
RUN = ["train.max_iters=6", "train.eval_interval=3", "train.checkpoint_interval=3", "train.log_interval=1"]


def _trainer(tmp_path, name, overrides=()):
    return Trainer(tiny_config(tmp_path, [*RUN, f"work_dir={tmp_path / name}", *overrides]), console=False,
                   progress=False)


def _stop_with_signal_after(trainer, steps, signum=signal.SIGTERM):
    """Make the process receive ``signum`` during step ``steps`` (as a scheduler's preemption would)."""
    step = trainer.run_step

    def wrapped(batch):
        if trainer.iteration == steps - 1:
            os.kill(os.getpid(), signum)
        return step(batch)

    trainer.run_step = wrapped


def _assert_same_state(a: Trainer, b: Trainer):
    for (k, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), k
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    # the run stopped by the signal skipped its scheduled evaluation (stopping must be quick)
    last_a, last_b = a.history[-1], b.history[-1]
    assert last_a.keys() == last_b.keys()
    assert all(last_a[k] == last_b[k] or (math.isnan(last_a[k]) and math.isnan(last_b[k])) for k in last_a)
    assert (a.iteration, a.data_position) == (b.iteration, b.data_position)


def _assert_same_nested(a, b, where="balancer"):
    """Equal states: tensors bit for bit, through dicts and lists."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_nested(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# methods with state across steps: T x P gradient state (dbmtl, excessmtl), random draws on the device
# (graddrop), three batches a step (sdmgrad), a T x T state with random orders (gradvac), phases (stch)
STATEFUL = [("dbmtl", ()), ("excessmtl", ()), ("graddrop", ()), ("sdmgrad", ()), ("gradvac", ()),
            ("stch", ("balancer.kwargs.warmup_iters=2", "balancer.kwargs.nadir_iters=2"))]


@pytest.mark.parametrize("method,workers,kwargs", [("ew", 0, ()), ("dwa", 0, ()), ("rlw", 0, ()),
                                                   ("pcgrad", 0, ()), ("ew", 2, ()),
                                                   *[(m, 0, kw) for m, kw in STATEFUL]])
def test_stop_and_resume_is_bit_exact(tmp_path, method, workers, kwargs):
    over = [f"balancer.name={method}", f"data.num_workers={workers}", *kwargs]
    straight = _trainer(tmp_path, "straight", over)
    straight.train()
    rng_after_straight = torch.get_rng_state()

    first = _trainer(tmp_path, "resumed", over)
    _stop_with_signal_after(first, 3)
    first.train()
    assert first.stopped_by == "SIGTERM" and first.iteration == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    ckpt = tmp_path / "resumed" / "checkpoints" / "last.pth"
    assert load_checkpoint(ckpt)["iteration"] == 3

    torch.manual_seed(12345)  # whatever happened in between must not matter
    second = _trainer(tmp_path, "resumed", over)
    second.resume(ckpt)
    second.train()
    assert second.iteration == 6 and second.stopped_by is None
    _assert_same_state(straight, second)
    assert torch.equal(rng_after_straight, torch.get_rng_state())
    _assert_same_nested(straight.balancer.state_dict(), second.balancer.state_dict())


def test_checkpoint_holds_everything_and_loads_weights_only(tmp_path):
    t = _trainer(tmp_path, "w", ["train.max_iters=3"])
    t.train()
    state = torch.load(tmp_path / "w" / "checkpoints" / "last.pth", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "balancer", "rng", "data", "counters", "best", "history",
                "config", "iteration"):
        assert key in state, key
    assert state["format"] == 2 and state["iteration"] == 3
    assert len(state["rng"]) == 1 and {"python", "numpy", "torch"} <= set(state["rng"][0])
    assert state["data"] == {"epoch": 1, "batch_in_epoch": 1, "world_size": 1}
    assert not list((tmp_path / "w" / "checkpoints").glob("*.tmp"))  # atomic writes leave no temp file


def test_resume_refuses_another_experiment(tmp_path):
    t = _trainer(tmp_path, "a", ["train.max_iters=3"])
    t.train()
    other = _trainer(tmp_path, "b", ["balancer.name=mgda"])
    with pytest.raises(CheckpointError, match="another balancer config"):
        other.resume(tmp_path / "a" / "checkpoints" / "last.pth")
    other = _trainer(tmp_path, "c", ["model.neck.out_channels=8"])
    with pytest.raises(CheckpointError, match="another model config"):
        other.resume(tmp_path / "a" / "checkpoints" / "last.pth")
    with pytest.raises(FileNotFoundError):
        other.resume(tmp_path / "nowhere.pth")


@pytest.mark.parametrize("saved_fused,resumed_fused", [(False, True), (True, False)])
def test_resume_keeps_this_runs_optimizer_implementation(tmp_path, saved_fused, resumed_fused):
    """optimizer.fused of the resuming config wins over the checkpoint's (torch would restore the
    checkpoint's); the moments and step counters carry over, and the resumed run steps on."""
    constant = "schedule.name=constant"  # (a cosine schedule of 3 iterations ends at lr 0)
    t = _trainer(tmp_path, "a",
                 ["train.max_iters=3", constant, f"optimizer.fused={str(saved_fused).lower()}"])
    t.train()
    saved = torch.load(tmp_path / "a" / "checkpoints" / "last.pth", weights_only=True)["optimizer"]["state"]
    resumed = _trainer(tmp_path, "b", [constant, f"optimizer.fused={str(resumed_fused).lower()}"])
    resumed.resume(tmp_path / "a" / "checkpoints" / "last.pth")
    assert all(bool(g["fused"]) is resumed_fused for g in resumed.optimizer.param_groups)
    state = resumed.optimizer.state_dict()["state"]
    assert state.keys() == saved.keys()
    for i in saved:
        assert float(state[i]["step"]) == 3 and state[i]["step"].dtype == torch.float32
        assert torch.equal(state[i]["exp_avg"], saved[i]["exp_avg"])
        assert torch.equal(state[i]["exp_avg_sq"], saved[i]["exp_avg_sq"])
    before = [p.detach().clone() for p in resumed.model.parameters()]
    assert resumed.iterate(next(iter(resumed.train_loader))).skipped == 0
    assert all(float(s["step"]) == 4 for s in resumed.optimizer.state.values())
    assert not all(torch.equal(p, q) for p, q in zip(before, resumed.model.parameters()))


def test_too_many_non_finite_steps_in_a_row_stop_with_a_clear_error(tmp_path):
    t = _trainer(tmp_path, "nan", ["train.max_consecutive_skips=3"])
    before = [p.detach().clone() for p in t.model.parameters()]
    losses = t.loss_fn.task_losses
    t.loss_fn.task_losses = lambda outputs, batch: losses(outputs, batch) * float("nan")
    with pytest.raises(TrainingError, match=r"3 non-finite steps in a row .*train.max_consecutive_skips = 3"):
        t.train()
    assert t.skipped_steps == 3 and t.iteration == 3
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))  # nothing corrupted
    assert "step skipped (3 so far, 3 in a row)" in (tmp_path / "nan" / "train.log").read_text()


def test_a_finite_step_resets_the_run_of_skips(tmp_path):
    t = _trainer(tmp_path, "some", ["train.max_consecutive_skips=2"])
    losses = t.loss_fn.task_losses
    bad = {0, 2, 4}  # every other step: never 2 in a row; the last one finite

    def flaky(outputs, batch):
        out = losses(outputs, batch)
        return out * float("nan") if t.iteration in bad else out

    t.loss_fn.task_losses = flaky
    t.train()
    assert t.iteration == 6 and t.skipped_steps == 3 and t.consecutive_skips == 0


def _train_cmd(cfg_path, *extra):
    return [sys.executable, str(ROOT / "tools" / "train.py"), str(cfg_path), "--no-progress", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_exits_zero_then_resume_finishes(tmp_path, signum):
    from .helpers import write_tiny_config

    cfg = write_tiny_config(tmp_path)
    over = ["train.max_iters=400", "train.checkpoint_interval=2", "train.eval_interval=1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_train_cmd(cfg, *over), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "work" / "checkpoints" / "last.pth"
    wait_for_file(ckpt, proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    name = signal.Signals(signum).name
    assert f"stopped by {name}" in out
    stopped_at = load_checkpoint(ckpt)["iteration"]
    assert 2 <= stopped_at < 400
    assert f"stopped by {name} at iteration {stopped_at}" in (tmp_path / "work" / "train.log").read_text()

    # resumed in this process (the same tools/train.py main, without another interpreter start-up)
    done = run_tool("train.py", cfg, "--no-progress", "train.max_iters=" + str(stopped_at + 2),
                    "train.checkpoint_interval=2", "train.eval_interval=1000", "--resume")
    # a shorter max_iters changes the LR schedule, so the config is not the one saved: still resumable
    assert done == 0
    assert load_checkpoint(ckpt)["iteration"] == stopped_at + 2
    assert f"resumed from {ckpt}" in (tmp_path / "work" / "train.log").read_text()


@pytest.mark.slow
def test_resume_flag_without_checkpoint_starts_fresh(tmp_path, capsys):
    from .helpers import write_tiny_config

    cfg = write_tiny_config(tmp_path)
    assert run_tool("train.py", cfg, "--no-progress", "train.max_iters=2", "--resume") == 0
    assert "resumed" not in (tmp_path / "work" / "train.log").read_text()
    capsys.readouterr()
    assert run_tool("train.py", cfg, "--no-progress", "--resume", tmp_path / "missing.pth") == 2
    assert "missing.pth" in capsys.readouterr().err


def test_resume_is_bit_exact_with_augmentation_and_workers(tmp_path):
    """Files read by worker processes and augmented at random: each sample's augmentation comes from the
    seed the sampler hands out with it, so a resumed run sees exactly the same pixels."""
    from .test_switches import _custom_data

    over = [*_custom_data(tmp_path, corrupt=False), "data.num_workers=2", "data.augment.hflip=0.5",
            "data.augment.scale_range=[1.0, 1.5]", "data.augment.color_jitter=0.2"]
    straight = _trainer(tmp_path, "straight", over)
    straight.train()
    first = _trainer(tmp_path, "resumed", over)
    _stop_with_signal_after(first, 3)
    first.train()
    second = _trainer(tmp_path, "resumed", over)
    second.resume(tmp_path / "resumed" / "checkpoints" / "last.pth")
    second.train()
    _assert_same_state(straight, second)


def test_resume_with_more_iterations_follows_the_new_schedule(tmp_path):
    """Training a finished run further (a larger train.max_iters) continues the LR schedule of the new
    config; the checkpoint's saved schedule (the old max_iters) would leave the LR where it ended."""
    first = _trainer(tmp_path, "grow", ["train.max_iters=4"])
    first.train()
    longer = _trainer(tmp_path, "grow", ["train.max_iters=8"])
    longer.resume(tmp_path / "grow" / "checkpoints" / "last.pth")
    assert longer.scheduler.lr_lambdas[0].max_iters == 8 and longer.iteration == 4
    lr0 = longer.optimizer.param_groups[0]["initial_lr"]
    # the next update (iteration 4 of a cosine over 8) uses lr0 * (1 + cos(pi / 2)) / 2; the old schedule
    # had ended at 0
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * lr0, rel=1e-9)
    longer.train()
    # cosine to 0 over 8 iterations: after iteration 7 (the last update) the LR is lr0 * (1 + cos(pi))/2 = 0
    assert longer.iteration == 8
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12 * lr0)
