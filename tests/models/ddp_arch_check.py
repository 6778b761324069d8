"""Run by test_architectures_ddp.py under `torchrun --nproc_per_node=2` (gloo, CPU): for each architecture,
one step's gradients with 2 processes (half the batch each) equal one process on the whole batch, through
DDP (a loss weighting, EW) and through the GradientBalancer (PCGrad; at the rep level where the
architecture has a shared representation).

    python -m torch.distributed.run --nproc_per_node=2 tests/models/ddp_arch_check.py ARCH ...
"""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mtvision.balancing import GradientBalancer, build_balancer
from mtvision.losses import MultiTaskLoss
from mtvision.models import build_model
from mtvision.tasks import build_tasks
from mtvision.tasks.outputs import task_output_tensors

TASKS = ["seg", "depth", "normal"]
MODEL = {"backbone": {"name": "test_resnet"}, "neck": {"name": "fpn", "out_channels": 16},
         "heads": {"seg": {"name": "segmentation", "num_classes": 6, "channels": 16},
                   "depth": {"name": "depth", "channels": 16}, "normal": {"name": "normals", "channels": 16}}}


def global_batch(n=4):
    """Every pixel valid, so the mean of the per-process mean losses is the global mean loss."""
    g = torch.Generator().manual_seed(7)
    return {"image": torch.randn(n, 3, 32, 48, generator=g),
            "seg": torch.randint(0, 6, (n, 32, 48), generator=g),
            "depth": torch.rand(n, 1, 32, 48, generator=g) + 0.5,
            "normal": F.normalize(torch.randn(n, 3, 32, 48, generator=g), dim=1)}


def fixed_statistics(model):
    """Training mode (PAD-Net's initial outputs) with BatchNorm on running statistics (no batch-size
    dependence)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def grads_of(model):
    return [p.grad.clone() for p in model.parameters()]


def ew_grads(model, forward_model, loss_fn, batch):
    model.zero_grad(set_to_none=True)
    loss_fn.task_losses(forward_model(batch["image"]), batch).sum().backward()
    return grads_of(model)


def balanced_grads(model, balancer, loss_fn, batch, level):
    model.zero_grad(set_to_none=True)
    features = head_inputs = None
    if level == "rep":
        features = model.forward_features(batch["image"])
        head_inputs = [f.detach().requires_grad_() for f in features]
        out = model.forward_heads(head_inputs, batch["image"].shape[-2:])
    else:
        out = model(batch["image"])
    losses = loss_fn.task_losses(out, batch)
    mean = losses.detach().clone()
    if balancer.distributed is None:
        dist.all_reduce(mean)
        mean /= dist.get_world_size()
    w = balancer.combine(losses, task_output_tensors(out, TASKS), features, head_inputs, mean_losses=mean).weights
    return w, grads_of(model)


def check(arch, rank, world):
    torch.manual_seed(0)
    model = fixed_statistics(build_model({**MODEL, "arch": {"name": arch}}))
    loss_fn = MultiTaskLoss(build_tasks(TASKS, 6))
    full = global_batch(2 * world)
    local = {k: v[2 * rank:2 * rank + 2] for k, v in full.items()}
    ddp = DistributedDataParallel(model)
    mine, ref = ew_grads(model, ddp, loss_fn, local), ew_grads(model, model, loss_fn, full)
    for g, r in zip(mine, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    levels = ["param", "rep"] if model.rep_level else ["param"]
    for level in levels:
        def balancer(distributed):
            return GradientBalancer(build_balancer("pcgrad", len(TASKS)), list(model.shared_parameters()),
                                    [list(model.task_parameters(t)) for t in TASKS], level=level,
                                    generator=torch.Generator().manual_seed(1), distributed=distributed)
        with ddp.no_sync():
            w, mine = balanced_grads(model, balancer(None), loss_fn, local, level)
        w_ref, ref = balanced_grads(model, balancer(False), loss_fn, full, level)
        torch.testing.assert_close(w, w_ref, rtol=1e-4, atol=1e-6)
        for g, r in zip(mine, ref):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    if rank == 0:
        print(f"DDP {arch}: ew and pcgrad ({', '.join(levels)}) equal to one process on the global batch")


def main(archs):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for arch in archs:
        check(arch, rank, world)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
