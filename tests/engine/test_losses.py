"""DenseMultiTaskLoss and MultiTaskLoss against the pure-PyTorch reference, per task and for task subsets."""

import pytest
import torch

from mtvision.losses import DenseMultiTaskLoss, MultiTaskLoss
from mtvision.ops import reference
from mtvision.tasks import Task, build_tasks


def _data(seed=0, b=2, c=6, h=9, w=11):
    g = torch.Generator().manual_seed(seed)
    seg_t = torch.randint(0, c, (b, h, w), generator=g)
    seg_t[0, :3] = 255  # ignored pixels
    depth_t = torch.rand(b, 1, h, w, generator=g) * 5
    depth_t[:, :, :2] = 0  # invalid depth
    normal_t = torch.nn.functional.normalize(torch.randn(b, 3, h, w, generator=g), dim=1)
    normal_t[1, :, -2:] = 0  # invalid normals
    outputs = {
        "seg": torch.randn(b, c, h, w, generator=g, requires_grad=True),
        "depth": (torch.rand(b, 1, h, w, generator=g) * 5).requires_grad_(),
        "normal": torch.randn(b, 3, h, w, generator=g, requires_grad=True),
    }
    return outputs, {"seg": seg_t, "depth": depth_t, "normal": normal_t}


def _reference(outputs, batch):
    return reference.fused_dense_loss(outputs["seg"], batch["seg"], outputs["depth"], batch["depth"],
                                      outputs["normal"], batch["normal"])


def test_equals_reference_per_task_with_gradients():
    outputs, batch = _data()
    loss = DenseMultiTaskLoss(["seg", "depth", "normal"])(outputs, batch)
    ref = _reference(outputs, batch)
    torch.testing.assert_close(loss, ref.float(), rtol=1e-5, atol=1e-6)
    assert loss.dtype == torch.float32 and loss.shape == (3,)
    w = torch.tensor([0.5, 2.0, 1.0])
    grads = torch.autograd.grad((w * loss).sum(), list(outputs.values()))
    ref_grads = torch.autograd.grad((w.to(ref.dtype) * ref).sum(), list(outputs.values()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r.to(g.dtype), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tasks", [["depth"], ["normal", "seg"]])
def test_task_subset_in_given_order(tasks):
    outputs, batch = _data(seed=1)
    vec = DenseMultiTaskLoss(tasks).task_losses({t: outputs[t] for t in tasks}, batch)
    ref = _reference(outputs, batch)
    slot = {"seg": 0, "depth": 1, "normal": 2}
    torch.testing.assert_close(vec, torch.stack([ref[slot[t]] for t in tasks]).float(), rtol=1e-5, atol=1e-6)


def test_ignore_index_is_used():
    outputs, batch = _data(seed=2)
    batch["seg"][:] = 7  # every pixel carries the custom ignore label: CE is 0, not NaN
    loss = DenseMultiTaskLoss(["seg"], ignore_index=7)(outputs, batch)
    assert loss.tolist() == [0.0]


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown task 'boxes'"):
        DenseMultiTaskLoss(["seg", "boxes"])
    outputs, batch = _data()
    with pytest.raises(KeyError, match="model outputs lack task 'normal'"):
        DenseMultiTaskLoss(["seg", "normal"])({"seg": outputs["seg"]}, batch)


class _EdgeTask(Task):
    """A task with its own loss (not one of the fused slots): mean squared error on an 'edges' map."""

    target_keys = ("edges",)

    def build_loss(self):
        return lambda output, batch: ((output - batch["edges"]) ** 2).mean()


def test_multitask_loss_puts_fused_and_own_losses_in_task_order():
    outputs, batch = _data(seed=3)
    outputs["edges"] = torch.randn(2, 1, 9, 11, requires_grad=True)
    batch["edges"] = torch.randn(2, 1, 9, 11)
    tasks = [*build_tasks(["normal"], 6), _EdgeTask("edges"), *build_tasks(["seg"], 6)]
    losses = MultiTaskLoss(tasks).task_losses(outputs, batch)
    ref = _reference(outputs, batch)
    expected = torch.stack([ref[2].float(), ((outputs["edges"] - batch["edges"]) ** 2).mean(), ref[0].float()])
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)
    # one backward through the [T] vector reaches every task's prediction
    grads = torch.autograd.grad(losses.sum(), [outputs["normal"], outputs["edges"], outputs["seg"]])
    assert all(g.abs().sum() > 0 for g in grads)
