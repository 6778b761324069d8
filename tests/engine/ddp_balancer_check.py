"""Run by test_ddp_balancer.py under `torchrun --nproc_per_node=2` (gloo, CPU): the GradientBalancer's
update with DDP over 2 processes (half the batch each) equals one process on the whole batch, over two
steps (so that a method's state, updated from the first, shapes the second).

    python -m torch.distributed.run --nproc_per_node=2 tests/engine/ddp_balancer_check.py METHOD:LEVEL ...
"""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from mtvision.balancing import build_balancer
from mtvision.balancing import GradientBalancer
from mtvision.models import build_model
from mtvision.ops import fused_dense_loss

TASKS = ["seg", "depth", "normal"]
MODEL = {"backbone": {"name": "test_resnet"}, "neck": {"name": "fpn", "out_channels": 16},
         "heads": {"seg": {"name": "segmentation", "num_classes": 6, "channels": 16},
                   "depth": {"name": "depth", "channels": 16}, "normal": {"name": "normals", "channels": 16}}}


def global_batch(n=4, seed=7):
    """Every pixel valid, so the mean of the per-process mean losses is the global mean loss."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 48, generator=g)
    targets = {"seg": torch.randint(0, 6, (n, 32, 48), generator=g),
               "depth": torch.rand(n, 1, 32, 48, generator=g) + 0.5,
               "normal": F.normalize(torch.randn(n, 3, 32, 48, generator=g), dim=1)}
    return images, targets


def step_grads(model, forward_model, balancer, batches, level):
    """Parameter gradients of one balanced backward on ``batches`` (one, or the K a method draws)."""
    model.zero_grad(set_to_none=True)
    losses, outputs, features, head_inputs = [], [], None, None
    for images, targets in batches:
        if level == "rep":
            features = model.forward_features(images)
            head_inputs = [f.detach().requires_grad_() for f in features]
            out = model.forward_heads(head_inputs, images.shape[-2:])
        else:
            out = forward_model(images)
        losses.append(fused_dense_loss(out["seg"], targets["seg"], out["depth"], targets["depth"],
                                       out["normal"], targets["normal"]))
        outputs += [out[t] for t in TASKS]
    losses = torch.cat(losses)
    mean = losses.detach().clone()
    if balancer.distributed is None:  # what the trainer passes: the losses averaged over processes
        dist.all_reduce(mean)
        mean /= dist.get_world_size()
    objective = balancer.aggregator.task_losses(losses, mean)
    w = balancer.combine(objective, outputs, features, head_inputs, mean_losses=mean).weights
    return w, [p.grad.clone() for p in model.parameters()]


def balancer_for(model, method, level, distributed):
    return GradientBalancer(build_balancer(method, len(TASKS)), list(model.shared_parameters()),
                            [list(model.task_parameters(t)) for t in TASKS], level=level,
                            generator=torch.Generator().manual_seed(1), distributed=distributed)


def check(method, level, rank, world):
    torch.manual_seed(0)
    model = build_model(MODEL).eval()  # BatchNorm on running statistics: no batch-size dependence
    ddp = DistributedDataParallel(model)
    mine, ref = balancer_for(model, method, level, None), balancer_for(model, method, level, False)
    local = slice(2 * rank, 2 * rank + 2)
    for step in range(2):
        batches = [global_batch(2 * world, seed=10 * step + k) for k in range(mine.batches_per_step)]
        with ddp.no_sync():  # the balancer reduces the gradients itself
            w, grads = step_grads(model, ddp, mine, [(x[local], {k: v[local] for k, v in y.items()})
                                                     for x, y in batches], level)
        w_ref, ref_grads = step_grads(model, model, ref, batches, level)
        torch.testing.assert_close(w, w_ref, rtol=1e-4, atol=1e-6)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
        # identical on every process
        gathered = [torch.zeros_like(w) for _ in range(world)]
        dist.all_gather(gathered, w)
        assert all(torch.equal(x, gathered[0]) for x in gathered)
        with torch.no_grad():  # the second step starts elsewhere
            for p, g in zip(model.parameters(), ref_grads):
                p.sub_(0.1 * g)
    if rank == 0:
        print(f"DDP {method} {level}: weights {w.tolist()} equal to one process on the global batch")


def main(specs):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for spec in specs:
        check(*spec.split(":"), rank, world)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
