"""Training steps with every balancing method, and the gradient methods' backward against its definition."""

import pytest
import torch

from mtvision.balancing import AGGREGATORS, BALANCERS, MGDA, PCGrad
from mtvision.config import config_to_dict
from mtvision.engine import Trainer
from mtvision.balancing import GradientBalancer
from mtvision.models import build_model
from mtvision.ops import reference

from .helpers import tiny_config

METHODS = [(name, "param") for name in BALANCERS] + [
    (name, "rep") for name, cls in AGGREGATORS.items() if "rep" in cls.levels and cls.__module__.startswith("mtvision")]


@pytest.mark.parametrize("name,level", METHODS)
def test_a_few_steps_with_each_method(tmp_path, name, level):
    cfg = tiny_config(tmp_path, [f"balancer.name={name}", f"balancer.level={level}", "train.max_iters=3",
                                 "train.eval_interval=3", "train.checkpoint_interval=3"])
    trainer = Trainer(cfg, console=False, progress=False)
    batches = list(trainer.train_loader)  # SDMGrad and MoDo take 3 a step
    batch = [batches[k % len(batches)] for k in range(trainer.balancer.batches_per_step)]
    before = [p.detach().clone() for p in trainer.model.parameters()]
    for _ in range(3):
        values = trainer.iterate(batch).as_dict()
        assert values["skipped"] == 0
        assert all(torch.isfinite(torch.tensor(v)) for k, v in values.items() if k != "skipped")
    # the logged total from the logged losses and weights: a gradient method's is the plain sum of the
    # task losses, a loss weighting's its objective (UW's with 0.5 * sum(log sigma^2), w = 0.5 / sigma^2)
    losses = torch.tensor([values[t] for t in trainer.tasks], dtype=torch.float64)
    weights = torch.tensor([values[f"weight/{t}"] for t in trainer.tasks], dtype=torch.float64)
    assert torch.isfinite(weights).all()
    if name in AGGREGATORS:
        expected = losses.sum()
    else:
        expected = (weights * losses).sum() - (0.5 * torch.log(2 * weights).sum() if name == "uw" else 0.0)
    assert values["total"] == pytest.approx(expected.item(), rel=1e-5), (values, expected)
    changed = [not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters())]
    assert all(changed), f"{sum(not c for c in changed)} parameters did not move"
    state = trainer.state_dict()
    # a loss weighting's state, or a gradient method's random generator (PCGrad's shuffles)
    assert ("generator" in state["balancer"]) == (name in AGGREGATORS)


def _model_and_losses(tmp_path, seed=0):
    cfg = tiny_config(tmp_path)
    torch.manual_seed(seed)
    model = build_model(config_to_dict(cfg.model))
    images = torch.randn(2, 3, 32, 48)
    targets = {"seg": torch.randint(0, 6, (2, 32, 48)), "depth": torch.rand(2, 1, 32, 48) + 0.5,
               "normal": torch.nn.functional.normalize(torch.randn(2, 3, 32, 48), dim=1)}
    return model, images, targets


def _losses(out, targets):
    return reference.fused_dense_loss(out["seg"], targets["seg"], out["depth"], targets["depth"],
                                      out["normal"], targets["normal"])


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_param_level_backward_equals_definition(tmp_path, memory_format):
    """p.grad of every shared parameter == sum_t w_t * d L_t / d p with w = method(Gramian of the
    flattened per-task gradients); heads get their own task's gradient. Every .grad has its
    parameter's strides (fused optimizers read it as flat memory in the parameter's order)."""
    model, images, targets = _model_and_losses(tmp_path)
    model = model.to(memory_format=memory_format)
    images = images.contiguous(memory_format=memory_format)
    tasks = ["seg", "depth", "normal"]
    shared = list(model.shared_parameters())
    losses = _losses(model(images), targets)
    jac = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], shared, retain_graph=True)])
                       for t in range(3)])
    head_grads = [torch.autograd.grad(losses[t], list(model.task_parameters(tasks[t])), retain_graph=True)
                  for t in range(3)]
    w_ref = MGDA().weights(jac.double() @ jac.double().T)
    expected = (w_ref.to(jac.dtype) @ jac)

    balancer = GradientBalancer(MGDA(), shared, [list(model.task_parameters(t)) for t in tasks])
    out = model(images)
    w = balancer.combine(_losses(out, targets), [out[t] for t in tasks]).weights
    torch.testing.assert_close(w.double(), w_ref.double(), rtol=1e-4, atol=1e-6)
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    for t in range(3):
        for p, g in zip(model.task_parameters(tasks[t]), head_grads[t]):
            torch.testing.assert_close(p.grad, g)
    assert all(p.grad.stride() == p.stride() for p in model.parameters())
    if memory_format == torch.channels_last:  # the case that needs it: 4-D weights stored NHWC
        assert any(not p.is_contiguous() for p in shared)


def test_rep_level_backward_equals_definition(tmp_path):
    """At the rep level the backbone gets d(sum_t w_t L_t)/d theta with w from the feature Gramian."""
    model, images, targets = _model_and_losses(tmp_path)
    tasks = ["seg", "depth", "normal"]
    shared = list(model.shared_parameters())
    feats = model.forward_features(images)
    losses = _losses(model.forward_heads(feats, images.shape[-2:]), targets)
    fjac = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], feats, retain_graph=True)])
                        for t in range(3)])
    gen = torch.Generator().manual_seed(3)
    w_ref = PCGrad().weights(fjac.double() @ fjac.double().T, gen)
    expected = torch.autograd.grad((w_ref.to(losses.dtype) * losses).sum(), shared)

    gen = torch.Generator().manual_seed(3)
    balancer = GradientBalancer(PCGrad(), shared, [list(model.task_parameters(t)) for t in tasks], level="rep",
                                generator=gen)
    feats = model.forward_features(images)
    head_inputs = [f.detach().requires_grad_() for f in feats]
    out = model.forward_heads(head_inputs, images.shape[-2:])
    w = balancer.combine(_losses(out, targets), [out[t] for t in tasks], feats, head_inputs).weights
    torch.testing.assert_close(w.double(), w_ref, rtol=1e-4, atol=1e-6)
    for p, g in zip(shared, expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("max_norm", [1e-3, 1e6])  # clipping, and a norm already below the limit
@pytest.mark.parametrize("method", [MGDA, PCGrad])
def test_param_level_clip_folded_into_the_weights_equals_clip_grad_norm(tmp_path, max_norm, method):
    """backward(max_norm=c) sets the gradients torch.nn.utils.clip_grad_norm_(params, c) gives after a
    backward without it, and reports the same total norm (from w^T G w and the heads' norm)."""
    tasks = ["seg", "depth", "normal"]
    grads, norms = [], []
    for clip in (None, max_norm):
        model, images, targets = _model_and_losses(tmp_path)
        balancer = GradientBalancer(method(), list(model.shared_parameters()),
                                    [list(model.task_parameters(t)) for t in tasks],
                                    generator=torch.Generator().manual_seed(5))
        out = model(images)
        combined = balancer.combine(_losses(out, targets), [out[t] for t in tasks], max_norm=clip)
        if clip is None:
            norms.append(torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_norm).item())
        else:
            norms.append(combined.grad_norm)
        grads.append([p.grad.clone() for p in model.parameters()])
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)
    for expected, got in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-9)
    if max_norm < 1:  # it did clip: the result has norm max_norm
        total = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads[1]]))
        assert total.item() == pytest.approx(max_norm, rel=1e-4)


def test_max_norm_needs_the_param_level(tmp_path):
    model, images, targets = _model_and_losses(tmp_path)
    tasks = ["seg", "depth", "normal"]
    balancer = GradientBalancer(MGDA(), list(model.shared_parameters()),
                                [list(model.task_parameters(t)) for t in tasks], level="rep")
    feats = model.forward_features(images)
    head_inputs = [f.detach().requires_grad_() for f in feats]
    out = model.forward_heads(head_inputs, images.shape[-2:])
    with pytest.raises(ValueError, match="max_norm needs level='param'"):
        balancer.combine(_losses(out, targets), [out[t] for t in tasks], feats, head_inputs, max_norm=1.0)


@pytest.mark.parametrize("name,level", [("mgda", "param"), ("cagrad", "param"), ("mgda", "rep")])
def test_trainer_clips_balanced_gradients_to_grad_clip(tmp_path, name, level):
    """train.grad_clip bounds the total norm of the gradients the update used, whether the balancer
    folds the clip into its weights (param level) or the trainer clips after the backward (rep)."""
    cfg = tiny_config(tmp_path, [f"balancer.name={name}", f"balancer.level={level}", "train.grad_clip=1e-3"])
    trainer = Trainer(cfg, console=False, progress=False)
    outcome = trainer.iterate(next(iter(trainer.train_loader)))
    assert not outcome.skipped
    total = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters()]))
    assert total.item() == pytest.approx(1e-3, rel=1e-4)
    folded = outcome.grad_norm
    assert (folded is not None and folded > 1e-3) == (level == "param")
