"""DenseMultiTaskLoss against the pure-PyTorch reference, per task, with weights and task subsets."""

import pytest
import torch

from mtvision.losses import DenseMultiTaskLoss
from mtvision.ops import reference


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


def test_equals_reference_per_task_and_weighted_total():
    outputs, batch = _data()
    weights = {"seg": 0.5, "depth": 2.0}
    loss = DenseMultiTaskLoss(["seg", "depth", "normal"], weights)(outputs, batch)
    ref = reference.fused_dense_loss(outputs["seg"], batch["seg"], outputs["depth"], batch["depth"],
                                     outputs["normal"], batch["normal"])
    for i, task in enumerate(["seg", "depth", "normal"]):
        torch.testing.assert_close(loss[task], ref[i], rtol=1e-5, atol=1e-6)
        assert loss[task].dtype == torch.float32 and loss[task].dim() == 0
    torch.testing.assert_close(loss["total"], 0.5 * ref[0] + 2.0 * ref[1] + 1.0 * ref[2],
                               rtol=1e-5, atol=1e-6)

    grads = torch.autograd.grad(loss["total"], list(outputs.values()))
    ref_total = 0.5 * ref[0] + 2.0 * ref[1] + ref[2]
    ref_grads = torch.autograd.grad(ref_total, list(outputs.values()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tasks", [["depth"], ["normal", "seg"]])
def test_task_subset_in_given_order(tasks):
    outputs, batch = _data(seed=1)
    loss_fn = DenseMultiTaskLoss(tasks)
    vec = loss_fn.task_losses({t: outputs[t] for t in tasks}, batch)
    ref = reference.fused_dense_loss(outputs["seg"], batch["seg"], outputs["depth"], batch["depth"],
                                     outputs["normal"], batch["normal"])
    slot = {"seg": 0, "depth": 1, "normal": 2}
    torch.testing.assert_close(vec, torch.stack([ref[slot[t]] for t in tasks]), rtol=1e-5, atol=1e-6)
    out = loss_fn.combine(vec)
    assert list(out) == [*tasks, "total"]
    torch.testing.assert_close(out["total"], vec.sum())


def test_ignore_index_is_used():
    outputs, batch = _data(seed=2)
    batch["seg"][:] = 7  # every pixel carries the custom ignore label: CE is 0, not NaN
    loss = DenseMultiTaskLoss(["seg"], ignore_index=7)(outputs, batch)
    assert loss["seg"].item() == 0.0


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown task 'boxes'"):
        DenseMultiTaskLoss(["seg", "boxes"])
    with pytest.raises(ValueError, match=r"loss.weights.depth: no such task"):
        DenseMultiTaskLoss(["seg"], {"depth": 1.0})
    outputs, batch = _data()
    with pytest.raises(KeyError, match="model outputs lack task 'normal'"):
        DenseMultiTaskLoss(["seg", "normal"])({"seg": outputs["seg"]}, batch)
