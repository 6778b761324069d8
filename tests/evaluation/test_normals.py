import math

import numpy as np
import pytest
import torch

from mtvision.evaluation import NormalMetric
from mtvision.evaluation.normals import NUM_BINS

MEDIAN_BOUND = 0.005 + 1e-9  # documented: half a 0.01-degree bin (plus float rounding)


def _np_angles(pred, target):
    """Angles (degrees) of the valid pixels, numpy only, on [N,3,H,W] arrays."""
    p = np.moveaxis(pred.astype(np.float64), 1, -1).reshape(-1, 3)
    t = np.moveaxis(target.astype(np.float64), 1, -1).reshape(-1, 3)
    valid = np.linalg.norm(t, axis=1) > 0
    p, t = p[valid], t[valid]
    p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    return np.degrees(np.arccos(np.clip(np.sum(p * t, axis=1), -1, 1)))


def _np_normals(pred, target):
    a = _np_angles(pred, target)
    return {
        "mean": a.mean(),
        "median": np.median(a),
        "rmse": np.sqrt(np.mean(a ** 2)),
        "within_11.25": np.mean(a < 11.25) * 100,
        "within_22.5": np.mean(a < 22.5) * 100,
        "within_30": np.mean(a < 30) * 100,
    }


def _at_angles(degrees):
    """pred/target [1,3,1,N]: target +z, pred rotated by the given angles about the y axis."""
    a = torch.tensor(degrees, dtype=torch.float64).deg2rad()
    pred = torch.stack([a.sin(), torch.zeros_like(a), a.cos()]).reshape(1, 3, 1, -1)
    target = torch.zeros_like(pred)
    target[:, 2] = 1.0
    return pred.float(), target.float()


def test_hand_computed_example():
    pred, target = _at_angles([0.0, 20.0, 45.0, 90.0, 180.0, 33.0])
    pred = pred * torch.tensor([2.0, 1.0, 0.5, 3.0, 1.0, 1.0]).reshape(1, 1, 1, -1)  # raw, unnormalised
    target[..., -1] = 0.0  # last pixel invalid
    m = NormalMetric()
    m.update(pred, target)
    r = m.compute()
    assert set(r) == {"mean", "median", "rmse", "within_11.25", "within_22.5", "within_30"}
    # valid angles 0, 20, 45, 90, 180
    assert r["mean"] == pytest.approx(335 / 5, abs=1e-4)
    assert r["median"] == pytest.approx(45.0, abs=MEDIAN_BOUND)
    assert r["rmse"] == pytest.approx(math.sqrt((0 + 400 + 2025 + 8100 + 32400) / 5), abs=1e-4)
    assert r["within_11.25"] == pytest.approx(20.0)
    assert r["within_22.5"] == pytest.approx(40.0)
    assert r["within_30"] == pytest.approx(40.0)


def test_even_count_median_is_mean_of_middle_bins():
    pred, target = _at_angles([10.0, 50.0, 5.0, 170.0])
    m = NormalMetric()
    m.update(pred, target)
    assert m.compute()["median"] == pytest.approx(30.0, abs=MEDIAN_BOUND)  # (10 + 50) / 2, as numpy
    m.reset()
    pred, target = _at_angles([180.0])
    m.update(pred, target)
    assert m.compute()["median"] == pytest.approx(179.995)  # 180 falls in the last bin


def test_zero_prediction_counts_as_90_degrees():
    target = torch.zeros(1, 3, 1, 1)
    target[:, 1] = 1.0
    m = NormalMetric()
    m.update(torch.zeros(1, 3, 1, 1), target)
    assert m.compute()["mean"] == pytest.approx(90.0)


def _random_set(seed, n=14, h=7, w=9):
    g = np.random.default_rng(seed)
    target = g.normal(size=(n, 3, h, w))
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    pred = 3.0 * (target + g.normal(scale=0.4, size=target.shape))  # raw, mostly near the target
    mask = g.random((n, 1, h, w)) < 0.15
    target = np.where(mask, 0.0, target)
    target[5] = 0.0  # an image without valid normals
    return pred.astype(np.float32), target.astype(np.float32)


def _run(pred, target, bs):
    m = NormalMetric()
    for i in range(0, len(pred), bs):
        m.update(torch.from_numpy(pred[i:i + bs]), torch.from_numpy(target[i:i + bs]))
    return m.compute()


def test_random_against_numpy():
    pred, target = _random_set(0)
    r = _run(pred, target, 4)
    ref = _np_normals(pred, target)
    for k in ("mean", "rmse", "within_11.25", "within_22.5", "within_30"):
        assert r[k] == pytest.approx(ref[k], rel=1e-9), k
    assert abs(r["median"] - ref["median"]) <= MEDIAN_BOUND


@pytest.mark.parametrize("n_pixels", [2001, 2000, 1, 2])
def test_median_within_bound_of_numpy(n_pixels):
    g = np.random.default_rng(n_pixels)
    target = g.normal(size=(1, 3, 1, n_pixels))
    pred = target + g.normal(scale=0.5, size=target.shape)
    m = NormalMetric()
    m.update(torch.from_numpy(pred), torch.from_numpy(target))
    ref = np.median(_np_angles(pred, target))
    assert abs(m.compute()["median"] - ref) <= MEDIAN_BOUND


def test_batch_size_does_not_matter():
    pred, target = _random_set(1)
    r1, r7 = _run(pred, target, 1), _run(pred, target, 7)
    for k in r1:
        if k in ("mean", "rmse"):
            assert r1[k] == pytest.approx(r7[k], rel=1e-12, abs=0)  # float64 sums, summation order only
        else:
            assert r1[k] == r7[k]  # from integer counts / histogram: exactly equal


def test_state_is_bounded_and_compute_is_pure():
    pred, target = _random_set(2)
    m = NormalMetric()
    for _ in range(3):
        m.update(torch.from_numpy(pred), torch.from_numpy(target))
    assert m.hist.shape == (NUM_BINS,) and m.hist.dtype == torch.int64
    assert int(m.hist.sum()) == int(m.counts[0])
    assert m.compute() == m.compute()
    assert m.compute() == pytest.approx(_run(pred, target, 14), rel=1e-12)  # triple data, same stats


def test_no_valid_pixel_returns_nan():
    m = NormalMetric()
    assert all(math.isnan(v) for v in m.compute().values())
    m.update(torch.randn(2, 3, 4, 4), torch.zeros(2, 3, 4, 4))
    r = m.compute()
    assert len(r) == 6 and all(math.isnan(v) for v in r.values())
    m.reset()
    pred, target = _at_angles([0.0])
    m.update(pred, target)
    assert m.compute()["within_11.25"] == 100.0


def test_bad_shapes_raise():
    m = NormalMetric()
    with pytest.raises(ValueError, match=r"\[B,3,H,W\].*\(1, 1, 2, 2\)"):
        m.update(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
