"""Run by test_ddp_balancer.py under `torchrun --nproc_per_node=2` (gloo, CPU): the GradientBalancer's
update with DDP over 2 processes (half the batch each) equals one process on the whole batch.

    python -m torch.distributed.run --nproc_per_node=2 tests/engine/ddp_balancer_check.py METHOD LEVEL
"""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from mtvision.balancing import AGGREGATORS
from mtvision.balancing import GradientBalancer
from mtvision.models import build_model
from mtvision.ops import fused_dense_loss

TASKS = ["seg", "depth", "normal"]
MODEL = {"backbone": {"name": "test_resnet"}, "neck": {"name": "fpn", "out_channels": 16},
         "heads": {"seg": {"name": "segmentation", "num_classes": 6, "channels": 16},
                   "depth": {"name": "depth", "channels": 16}, "normal": {"name": "normals", "channels": 16}}}


def global_batch(n=4):
    """Every pixel valid, so the mean of the per-process mean losses is the global mean loss."""
    g = torch.Generator().manual_seed(7)
    images = torch.randn(n, 3, 32, 48, generator=g)
    targets = {"seg": torch.randint(0, 6, (n, 32, 48), generator=g),
               "depth": torch.rand(n, 1, 32, 48, generator=g) + 0.5,
               "normal": F.normalize(torch.randn(n, 3, 32, 48, generator=g), dim=1)}
    return images, targets


def step_grads(model, forward_model, images, targets, method, level, distributed):
    """Parameter gradients of one balanced backward on this batch."""
    balancer = GradientBalancer(AGGREGATORS[method](), list(model.shared_parameters()),
                                [list(model.task_parameters(t)) for t in TASKS], level=level,
                                generator=torch.Generator().manual_seed(1), distributed=distributed)
    model.zero_grad(set_to_none=True)
    features = head_inputs = None
    if level == "rep":
        features = model.forward_features(images)
        head_inputs = [f.detach().requires_grad_() for f in features]
        out = model.forward_heads(head_inputs, images.shape[-2:])
    else:
        out = forward_model(images)
    losses = fused_dense_loss(out["seg"], targets["seg"], out["depth"], targets["depth"], out["normal"],
                              targets["normal"])
    w = balancer.combine(losses, [out[t] for t in TASKS], features, head_inputs).weights
    return w, [p.grad.clone() for p in model.parameters()]


def main(method, level):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = build_model(MODEL).eval()  # BatchNorm on running statistics: no batch-size dependence
    ddp = DistributedDataParallel(model)
    images, targets = global_batch(2 * world)
    local = slice(2 * rank, 2 * rank + 2)
    with ddp.no_sync():  # the balancer reduces the gradients itself
        w, grads = step_grads(model, ddp, images[local], {k: v[local] for k, v in targets.items()},
                              method, level, distributed=None)
    w_ref, ref = step_grads(model, model, images, targets, method, level, distributed=False)
    torch.testing.assert_close(w, w_ref, rtol=1e-4, atol=1e-6)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    # identical on every process
    gathered = [torch.zeros_like(w) for _ in range(world)]
    dist.all_gather(gathered, w)
    assert all(torch.equal(x, gathered[0]) for x in gathered)
    if rank == 0:
        print(f"DDP {method} {level}: weights {w.tolist()} equal to one process on the global batch")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
