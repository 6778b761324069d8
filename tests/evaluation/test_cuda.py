"""The metrics accumulate on the inputs' device; on CUDA they must match the CPU result."""

import numpy as np
import pytest
import torch

from mtvision.evaluation import DepthMetric, NormalMetric, SegmentationMetric

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs():
    g = torch.Generator().manual_seed(0)
    seg_t = torch.randint(0, 5, (6, 16, 20), generator=g)
    seg_t[torch.rand(6, 16, 20, generator=g) < 0.1] = 255
    seg_p = torch.randint(0, 5, (6, 16, 20), generator=g)
    depth_t = torch.rand(6, 1, 16, 20, generator=g) * 4
    depth_t[depth_t < 0.3] = 0
    depth_p = depth_t + torch.randn(6, 1, 16, 20, generator=g) * 0.2
    normal_t = torch.nn.functional.normalize(torch.randn(6, 3, 16, 20, generator=g), dim=1)
    normal_p = normal_t + 0.4 * torch.randn(6, 3, 16, 20, generator=g)
    return [
        (SegmentationMetric, seg_p, seg_t),
        (DepthMetric, depth_p, depth_t),
        (NormalMetric, normal_p, normal_t),
    ]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_cuda_matches_cpu(index):
    cls, pred, target = _inputs()[index]
    args = (5,) if cls is SegmentationMetric else ()
    cpu, gpu = cls(*args), cls(*args)
    for i in range(0, 6, 4):
        cpu.update(pred[i:i + 4], target[i:i + 4])
        gpu.update(pred[i:i + 4].cuda(), target[i:i + 4].cuda())
    state = [v for v in vars(gpu).values() if isinstance(v, torch.Tensor)]
    assert state and all(t.is_cuda for t in state)
    a, b = cpu.compute(), gpu.compute()
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.asarray(b[k], dtype=float), np.asarray(a[k], dtype=float),
                                   rtol=1e-9, equal_nan=True, err_msg=k)
