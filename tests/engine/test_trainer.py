"""The Trainer: learning on a fixed batch, repeatability, outputs of a run, skipped non-finite steps."""

import json
import math

import pytest
import torch

from mtvision.config import ConfigError, load_config
from mtvision.engine import Trainer, primary_score
from mtvision.engine.checkpoint import load_checkpoint
from mtvision.engine.hooks import HookBase
from mtvision.engine.utils import clip_grad_norm

from .helpers import tiny_config


def _same(a, b):
    """Equal metric dicts, NaN equal to NaN (a class absent from a tiny validation set has NaN IoU)."""
    return a.keys() == b.keys() and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in
                                        ((a[k], b[k]) for k in a))


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_steps_on_a_fixed_batch_lower_the_loss(tmp_path):
    cfg = tiny_config(tmp_path, ["schedule.name=constant", "optimizer.lr=0.003", "train.max_iters=100"])
    trainer = Trainer(cfg, console=False, progress=False)
    batch = next(iter(trainer.train_loader))
    losses = [trainer.iterate(batch).as_dict() for _ in range(12)]
    assert all(v["skipped"] == 0 for v in losses)
    for key in ("seg", "depth", "normal", "total"):
        assert losses[-1][key] < losses[0][key], (key, [v[key] for v in losses])
    assert losses[-1]["total"] < 0.7 * losses[0]["total"]
    assert trainer.iteration == 12


def test_same_seed_same_losses_other_seed_other_losses(tmp_path):
    def run(seed):
        trainer = Trainer(tiny_config(tmp_path, [f"seed={seed}"]), console=False, progress=False)
        return [trainer.iterate(trainer._next_batch()).as_dict()["total"] for _ in range(3)], trainer

    a, ta = run(0)
    b, tb = run(0)
    c, _ = run(1)
    assert a == b  # bit-identical on CPU
    for p, q in zip(ta.model.parameters(), tb.model.parameters()):
        assert torch.equal(p, q)
    assert a != c


def test_train_writes_work_dir_and_checkpoints_load_weights_only(tmp_path):
    cfg = tiny_config(tmp_path)
    trainer = Trainer(cfg, console=False, progress=False)
    final = trainer.train()
    work = tmp_path / "work"
    for name in ("config.yaml", "train.log", "metrics.json", "checkpoints/last.pth", "checkpoints/best.pth"):
        assert (work / name).is_file(), name
    assert any((work / "tb").glob("events.out.tfevents.*"))
    assert load_config(work / "config.yaml") == cfg
    for key in ("seg/mIoU", "seg/pixAcc", "seg/IoU/floor", "depth/abs_err", "depth/rel_err", "normal/mean",
                "normal/median"):
        assert math.isfinite(final[key]), key

    last = torch.load(work / "checkpoints/last.pth", weights_only=True)
    assert last["iteration"] == 4 and _same(last["metrics"], final)
    assert last["config"]["data"]["size"] == [32, 48]
    best = load_checkpoint(work / "checkpoints/best.pth")
    assert best["iteration"] == trainer.best["iteration"] in (2, 4)
    # best.pth keeps what inference and Δm need, not the optimizer's moments: a fraction of last.pth
    assert set(best) == {"format", "iteration", "model", "metrics", "config"}
    assert (work / "checkpoints/best.pth").stat().st_size < 0.6 * (work / "checkpoints/last.pth").stat().st_size
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(last["model"][k], v), k

    summary = json.loads((work / "metrics.json").read_text())
    assert summary["iteration"] == 4 and summary["skipped_steps"] == 0
    assert [h["iteration"] for h in summary["history"]] == [2, 4]
    assert summary["final"]["seg/mIoU"] == pytest.approx(final["seg/mIoU"])
    best_score = max(primary_score(h, trainer.tasks) for h in summary["history"])
    assert summary["best"]["score"] == pytest.approx(best_score)
    log = (work / "train.log").read_text()
    assert "iter 4/4" in log and "eval @ 2" in log


@pytest.mark.parametrize("balancer", [[], ["balancer.name=pcgrad"], ["balancer.name=alignedmtl"],
                                      ["balancer.name=mgda", "balancer.level=rep"]],
                         ids=["ew", "pcgrad", "alignedmtl", "mgda-rep"])
def test_non_finite_loss_skips_the_step(tmp_path, balancer):
    # gradient methods learn of it from the Gramian's read-back; no solver sees the NaN
    trainer = Trainer(tiny_config(tmp_path, balancer), console=False, progress=False)
    batch = next(iter(trainer.train_loader))
    real = trainer.loss_fn.task_losses

    def nan_losses(outputs, batch):
        return real(outputs, batch) * torch.tensor([1.0, float("nan"), 1.0])

    trainer.loss_fn.task_losses = nan_losses
    before = _params(trainer.model)
    values = trainer.iterate(batch).as_dict()
    assert values["skipped"] == 1 and trainer.skipped_steps == 1 and trainer.iteration == 1
    assert all(torch.equal(p, q) for p, q in zip(before, trainer.model.parameters()))
    trainer.loss_fn.task_losses = real
    assert trainer.iterate(batch).as_dict()["skipped"] == 0
    assert not all(torch.equal(p, q) for p, q in zip(before, trainer.model.parameters()))


def test_single_task_config_trains(tmp_path):
    cfg = tiny_config(tmp_path, ["data.tasks=[depth]", "model.heads={depth: {name: depth, channels: 16}}",
                                 "train.max_iters=2"])
    final = Trainer(cfg, console=False, progress=False).train()
    assert all(k.startswith("depth/") for k in final)


def test_bad_balancer_fails_with_the_key(tmp_path):
    with pytest.raises(ConfigError, match="balancer.name: unknown balancing method 'mgdaa'"):
        Trainer(tiny_config(tmp_path, ["balancer.name=mgdaa"]), console=False, progress=False)


def test_bf16_autocast_on_cpu(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, ["train.amp=bf16"]), console=False, progress=False)
    batch = next(iter(trainer.train_loader))
    values = [trainer.iterate(batch).as_dict() for _ in range(2)]
    assert all(v["skipped"] == 0 and math.isfinite(v["total"]) for v in values)
    assert math.isfinite(trainer.evaluate()["seg/mIoU"])


@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clipping, and a norm already below the limit
def test_clip_grad_norm_equals_torch(max_norm):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s)) for s in [(4, 3, 3, 3), (7,), (5, 2)]]
    params.append(torch.nn.Parameter(torch.randn(3), requires_grad=False))  # no gradient: left out
    ours = [p.detach().clone().requires_grad_() for p in params[:3]]
    for p, q in zip(params[:3], ours):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(params[:3], max_norm)
    got = clip_grad_norm(ours + params[3:], max_norm)
    assert torch.equal(got, expected)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(params[:3], ours))
    after = torch.linalg.vector_norm(torch.cat([q.grad.reshape(-1) for q in ours]))
    torch.testing.assert_close(after, torch.clamp(expected, max=max_norm), rtol=1e-5, atol=0)


@pytest.mark.parametrize("balancer",
                         [[], ["balancer.name=mgda"], ["balancer.name=mgda", "balancer.level=rep"]])
def test_train_step_after_eval_trains_in_training_mode(tmp_path, balancer):
    """The step puts a model left in eval mode (by an evaluation or by hand) back into training mode
    (BatchNorm batch statistics), and with a gradient method it is the same step as from training mode."""
    def one_step(eval_first):
        trainer = Trainer(tiny_config(tmp_path, balancer), console=False, progress=False)
        if eval_first:
            trainer.evaluate()
            trainer.model.eval()
        trainer.iterate(next(iter(trainer.train_loader)))
        assert all(m.training for m in trainer.model.modules())
        return _params(trainer.model)

    assert all(torch.equal(p, q) for p, q in zip(one_step(False), one_step(True)))


class _FailAfterStep(HookBase):
    """Raises after step ``at`` (after the built-in hooks, so a checkpoint due at ``at`` was written)."""

    def __init__(self, at: int):
        self.at = at

    def after_step(self, outcome) -> None:
        if self.trainer.iteration == self.at:
            raise RuntimeError(f"failing after step {self.at}")


def _record_saves(trainer) -> list:
    saves, real = [], trainer.save

    def save(name, *args, gather=True, **kwargs):
        saves.append((name, trainer.iteration, gather))
        return real(name, *args, gather=gather, **kwargs)

    trainer.save = save
    return saves


@pytest.mark.parametrize("fail_at,saves_expected", [
    (2, [("last", 2, True)]),  # the periodic checkpoint of step 2 is kept, not overwritten
    (3, [("last", 2, True), ("last", 3, False)]),  # one step more than last.pth: the crash save keeps it
])
def test_a_failure_right_after_a_checkpoint_keeps_it(tmp_path, fail_at, saves_expected):
    """The crash save writes rank 0's random state only (no collectives after a failure); when last.pth
    already holds the failed iteration with every rank's state (a peer died right after a checkpoint),
    overwriting it would lose those states for nothing. Seen under torchrun: a killed worker made rank 0
    replace the checkpoint of the same step with a one-rank one, and the restarted run warned that the
    random states restart from rank 0's."""
    cfg = tiny_config(tmp_path, ["train.max_iters=4", "train.checkpoint_interval=2", "train.eval_interval=100"])
    t = Trainer(cfg, hooks=[_FailAfterStep(fail_at)])
    saves = _record_saves(t)
    with pytest.raises(RuntimeError, match=f"failing after step {fail_at}"):
        t.train()
    assert saves == saves_expected
    ckpt = tmp_path / "work" / "checkpoints" / "last.pth"
    assert load_checkpoint(ckpt)["iteration"] == fail_at
    (line,) = [x for x in (tmp_path / "work" / "train.log").read_text().splitlines() if "run failed" in x]
    reason = f"run failed at iteration {fail_at} (RuntimeError: failing after step {fail_at}); "
    assert reason in line
    assert ("already holds this iteration" in line) == (fail_at == 2), line


def test_a_failure_in_the_first_step_after_resuming_keeps_the_resumed_last_pth(tmp_path):
    cfg = tiny_config(tmp_path, ["train.max_iters=4", "train.checkpoint_interval=2", "train.eval_interval=100"])
    with pytest.raises(RuntimeError):
        Trainer(cfg, hooks=[_FailAfterStep(3)]).train()  # last.pth at step 3 (the crash save)
    t = Trainer(cfg)
    t.resume(tmp_path / "work" / "checkpoints" / "last.pth")

    def fail(batch):
        raise RuntimeError("the first step fails")

    t.run_step = fail
    saves = _record_saves(t)
    with pytest.raises(RuntimeError, match="the first step fails"):
        t.train()
    assert saves == []
    assert load_checkpoint(tmp_path / "work" / "checkpoints" / "last.pth")["iteration"] == 3
