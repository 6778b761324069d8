"""The gradient methods with state, element-wise combinations or several batches a step, in the trainer:
bf16 autocast, fp16 loss scaling (the balanced backward, on the CPU), and train.grad_clip."""

import pytest
import torch

from mtvision.balancing import GradientBalancer, build_balancer
from mtvision.engine import Trainer

from .helpers import tiny_config
from .test_balanced_training import _losses, _model_and_losses

NEW_METHODS = ["gradvac", "graddrop", "gls", "dbmtl", "fairgrad", "moco", "stch", "excessmtl", "sdmgrad", "modo",
               "config", "dualproj"]


def _step_batches(trainer):
    batches = list(trainer.train_loader)
    return [batches[k % len(batches)] for k in range(trainer.balancer.batches_per_step)]


@pytest.mark.parametrize("name", NEW_METHODS)
def test_bf16_autocast_steps(tmp_path, name):
    cfg = tiny_config(tmp_path, [f"balancer.name={name}", "train.amp=bf16"])
    trainer = Trainer(cfg, console=False, progress=False)
    batch = _step_batches(trainer)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    for _ in range(2):
        outcome = trainer.iterate(batch)
        assert not outcome.skipped
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


@pytest.mark.parametrize("name", ["dbmtl", "moco", "excessmtl", "graddrop", "gradvac", "mgda"])
def test_fp16_scaled_losses_give_the_scaled_update(tmp_path, name):
    """Under fp16 the losses come in multiplied by the GradScaler's scale (which changes between steps)
    and the update must be that scale times the unscaled method's; the methods that keep gradients across
    steps keep them unscaled."""
    model, images, targets = _model_and_losses(tmp_path)
    tasks = ["seg", "depth", "normal"]

    def balancer():
        return GradientBalancer(build_balancer(name, 3), list(model.shared_parameters()),
                                [list(model.task_parameters(t)) for t in tasks],
                                generator=torch.Generator().manual_seed(0))

    plain, scaled = balancer(), balancer()
    for scale in (1024.0, 256.0, 2048.0):
        grads = []
        for bal, s in ((plain, None), (scaled, scale)):
            model.zero_grad(set_to_none=True)
            out = model(images)
            losses = _losses(out, targets)
            objective = bal.aggregator.task_losses(losses, losses.detach())
            bal.combine(objective if s is None else objective * s, [out[t] for t in tasks],
                        inv_scale=None if s is None else 1.0 / s, mean_losses=losses.detach())
            grads.append([p.grad.clone() for p in model.parameters()])
        for a, b in zip(*grads):
            torch.testing.assert_close(b / scale, a, rtol=2e-4, atol=1e-7)
        with torch.no_grad():  # both balancers move on from the same point
            for p, g in zip(model.parameters(), grads[0]):
                p.sub_(1e-2 * g)


@pytest.mark.parametrize("name", ["graddrop", "excessmtl", "sdmgrad"])
def test_trainer_clips_to_grad_clip_when_the_clip_is_not_folded(tmp_path, name):
    """GradDrop (element-wise) and ExcessMTL (weighted heads) are clipped after the backward, SDMGrad's
    three-batch update is folded like any weighted sum: the gradients end at train.grad_clip."""
    cfg = tiny_config(tmp_path, [f"balancer.name={name}", "train.grad_clip=1e-3"])
    trainer = Trainer(cfg, console=False, progress=False)
    outcome = trainer.iterate(_step_batches(trainer))
    assert not outcome.skipped
    total = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters()]))
    assert total.item() == pytest.approx(1e-3, rel=1e-4)
    assert (outcome.grad_norm is not None) == (name == "sdmgrad")


def test_a_k_batch_method_refuses_one_batch(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, ["balancer.name=modo"]), console=False, progress=False)
    with pytest.raises(ValueError, match="'modo' takes 3 batches a step, got 1"):
        trainer.run_step(next(iter(trainer.train_loader)))


def test_level_the_method_does_not_allow_is_a_config_error(tmp_path):
    from mtvision.config import ConfigError

    with pytest.raises(ConfigError, match=r"balancer.level: 'dbmtl' is defined at the param level only"):
        Trainer(tiny_config(tmp_path, ["balancer.name=dbmtl", "balancer.level=rep"]), console=False)
