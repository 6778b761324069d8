import math

import numpy as np
import pytest
import torch

from mtvision.evaluation import DepthMetric
from mtvision.evaluation.depth import MIN_PRED_DEPTH


def _np_depth(pred, target):
    """Independent numpy reference: means over every valid pixel of the concatenated set."""
    valid = target > 0
    p, t = pred[valid].astype(np.float64), target[valid].astype(np.float64)
    pc = np.maximum(p, MIN_PRED_DEPTH)
    ratio = np.maximum(pc / t, t / pc)
    return {
        "abs_err": np.mean(np.abs(p - t)),
        "rel_err": np.mean(np.abs(p - t) / t),
        "rmse": np.sqrt(np.mean((p - t) ** 2)),
        "log10": np.mean(np.abs(np.log10(pc) - np.log10(t))),
        "delta1": np.mean(ratio < 1.25) * 100,
        "delta2": np.mean(ratio < 1.25 ** 2) * 100,
        "delta3": np.mean(ratio < 1.25 ** 3) * 100,
    }


def test_hand_computed_example():
    target = torch.tensor([[[[1.0, 2.0], [4.0, 0.0]]]])
    pred = torch.tensor([[[[2.0, 2.0], [3.0, 9.0]]]])  # last pixel invalid (target 0)
    m = DepthMetric()
    m.update(pred, target)
    r = m.compute()
    assert set(r) == {"abs_err", "rel_err", "rmse", "log10", "delta1", "delta2", "delta3"}
    assert r["abs_err"] == pytest.approx(2 / 3)  # |diffs| 1, 0, 1
    assert r["rel_err"] == pytest.approx((1 / 1 + 0 + 1 / 4) / 3)
    assert r["rmse"] == pytest.approx(math.sqrt(2 / 3))
    assert r["log10"] == pytest.approx((math.log10(2) + 0 + math.log10(4 / 3)) / 3)
    # ratios 2, 1, 4/3 against thresholds 1.25, 1.5625, 1.953125
    assert r["delta1"] == pytest.approx(100 / 3)
    assert r["delta2"] == pytest.approx(200 / 3)
    assert r["delta3"] == pytest.approx(200 / 3)


def test_nonpositive_prediction_is_clamped_for_log_and_ratio_only():
    target = torch.tensor([[[[1.0, 1.0]]]])
    pred = torch.tensor([[[[0.0, -1.0]]]])
    m = DepthMetric()
    m.update(pred, target)
    r = m.compute()
    assert all(math.isfinite(v) for v in r.values())
    assert r["abs_err"] == pytest.approx(1.5)  # raw prediction: |0-1|, |-1-1|
    assert r["rmse"] == pytest.approx(math.sqrt((1 + 4) / 2))
    assert r["log10"] == pytest.approx(-math.log10(MIN_PRED_DEPTH))  # both clamped to 1e-3
    assert r["delta3"] == 0.0


def _random_set(seed, n=14, h=6, w=7):
    g = np.random.default_rng(seed)
    target = g.uniform(0.5, 10.0, size=(n, 1, h, w)).astype(np.float32)
    target[g.random(target.shape) < 0.2] = 0.0
    target[3] = 0.0  # a whole image without valid depth
    noise = g.lognormal(0.0, 0.3, size=target.shape)
    pred = (target * noise + g.normal(0, 0.1, size=target.shape)).astype(np.float32)
    pred[0, 0, 0, :3] = [0.0, -0.5, 1e-5]
    target[0, 0, 0, :3] = [1.0, 2.0, 3.0]
    return pred, target


def _run(pred, target, bs):
    m = DepthMetric()
    for i in range(0, len(pred), bs):
        m.update(torch.from_numpy(pred[i:i + bs]), torch.from_numpy(target[i:i + bs]))
    return m.compute()


def test_random_against_numpy():
    pred, target = _random_set(0)
    r = _run(pred, target, 4)
    ref = _np_depth(pred, target)
    for k, v in ref.items():
        assert r[k] == pytest.approx(v, rel=1e-10), k


def test_batch_size_does_not_matter():
    pred, target = _random_set(1)
    r1, r7 = _run(pred, target, 1), _run(pred, target, 7)
    for k in r1:
        if k.startswith("delta"):
            assert r1[k] == r7[k]  # integer counts: exactly equal
        else:
            assert r1[k] == pytest.approx(r7[k], rel=1e-12, abs=0)  # float64 sums, summation order only


def test_pixel_mean_not_mean_of_batch_means():
    # batch A: one valid pixel with error 1; batch B: three valid pixels with error 0.
    m = DepthMetric()
    m.update(torch.tensor([[[[2.0, 5.0]]]]), torch.tensor([[[[1.0, 0.0]]]]))
    m.update(torch.ones(1, 1, 1, 3), torch.ones(1, 1, 1, 3))
    assert m.compute()["abs_err"] == pytest.approx(0.25)  # not (1 + 0) / 2


def test_no_valid_pixel_returns_nan_and_compute_is_pure():
    m = DepthMetric()
    assert all(math.isnan(v) for v in m.compute().values())
    m.update(torch.rand(2, 1, 3, 3), torch.zeros(2, 1, 3, 3))
    r = m.compute()
    assert all(math.isnan(v) for v in r.values()) and len(r) == 7
    pred, target = _random_set(2)
    m.update(torch.from_numpy(pred), torch.from_numpy(target))
    a, b = m.compute(), m.compute()
    assert a == b
    assert a["abs_err"] == pytest.approx(_np_depth(pred, target)["abs_err"], rel=1e-10)
    m.reset()
    assert all(math.isnan(v) for v in m.compute().values())


def test_half_precision_and_grad_inputs():
    target = torch.tensor([[[[1.0, 2.0]]]])
    pred = torch.tensor([[[[1.5, 2.0]]]], requires_grad=True)
    m = DepthMetric()
    m.update(pred, target)
    m.update(pred.detach().bfloat16(), target)
    assert m.compute()["abs_err"] == pytest.approx(0.25)


def test_bad_shapes_raise():
    m = DepthMetric()
    with pytest.raises(ValueError, match=r"\[B,1,H,W\].*\(2, 1, 3, 3\).*\(2, 1, 3, 4\)"):
        m.update(torch.ones(2, 1, 3, 3), torch.ones(2, 1, 3, 4))
    with pytest.raises(ValueError, match=r"\[B,1,H,W\]"):
        m.update(torch.ones(2, 3, 3), torch.ones(2, 3, 3))
