"""Two gloo processes, each updating part of the data, must give the one-process result on all data."""

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from mtvision.evaluation import DepthMetric, NormalMetric, SegmentationMetric
from mtvision.distributed import all_reduce_sum

from ..multiprocess import gloo_process_group, run_two_processes

C = 4


def _data(n=8, h=5, w=6):
    g = torch.Generator().manual_seed(0)
    seg_t = torch.randint(0, C, (n, h, w), generator=g)
    seg_t[torch.rand(n, h, w, generator=g) < 0.2] = 255
    seg_t[6:] = 255  # the second rank's second batch is entirely ignored
    seg_p = torch.randint(0, C, (n, h, w), generator=g)
    depth_t = torch.rand(n, 1, h, w, generator=g) * 5
    depth_t[depth_t < 0.5] = 0
    depth_p = depth_t + torch.randn(n, 1, h, w, generator=g) * 0.3
    normal_t = torch.nn.functional.normalize(torch.randn(n, 3, h, w, generator=g), dim=1)
    normal_t[:, :, 0] = 0
    normal_p = normal_t + 0.5 * torch.randn(n, 3, h, w, generator=g)
    return (seg_p, seg_t), (depth_p, depth_t), (normal_p, normal_t)


def _evaluate(parts, bs):
    metrics = (SegmentationMetric(C), DepthMetric(), NormalMetric())
    for m, (p, t) in zip(metrics, parts):
        for i in range(0, len(p), bs):
            m.update(p[i:i + bs], t[i:i + bs])
    return metrics


def _worker(rank, init_file, out_dir):
    with gloo_process_group(rank, init_file):
        # uneven shards: rank 0 gets images 0..4 in batches of 2, rank 1 images 5..7 one at a time
        shard = slice(0, 5) if rank == 0 else slice(5, 8)
        parts = [(p[shard], t[shard]) for p, t in _data()]
        metrics = _evaluate(parts, bs=2 if rank == 0 else 1)
        first = [m.compute() for m in metrics]
        second = [m.compute() for m in metrics]  # must not have doubled the state
        local = [m.confusion.clone() for m in metrics[:1]]
        summed = all_reduce_sum(
            [torch.tensor([rank + 1.0], dtype=torch.float64), torch.tensor([rank], dtype=torch.int64)]
        )
        torch.save({"first": first, "second": second, "local": local,
                    "summed": [t.tolist() for t in summed]}, os.path.join(out_dir, f"rank{rank}.pt"))


def _assert_same(a, b, rel=0.0):
    assert a.keys() == b.keys()
    for k in a:
        x, y = np.asarray(a[k], dtype=float), np.asarray(b[k], dtype=float)
        np.testing.assert_allclose(x, y, rtol=rel, atol=0, equal_nan=True, err_msg=k)


@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_gloo_processes_match_one_process(tmp_path):
    run_two_processes(_worker, tmp_path)

    expected = [m.compute() for m in _evaluate(_data(), bs=8)]
    full_seg = _evaluate(_data(), bs=8)[0].confusion
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        names = ("seg", "depth", "normal")
        for name, exp, first, second in zip(names, expected, got["first"], got["second"]):
            _assert_same(first, second)
            _assert_same(first, exp, rel=1e-12)
            assert all(not (isinstance(v, float) and math.isnan(v)) for v in first.values()), name
        # local state stays local (compute() reduces a copy)
        assert not torch.equal(got["local"][0], full_seg)
        assert got["summed"] == [[3.0], [1]]


def test_all_reduce_sum_without_process_group_copies():
    a = torch.arange(3)
    (b,) = all_reduce_sum([a])
    assert torch.equal(a, b) and b.data_ptr() != a.data_ptr()
