import math

import numpy as np
import pytest
import torch

from mtvision.evaluation import SegmentationMetric


def _np_seg(pred, target, num_classes, ignore_index=255):
    """Independent numpy reference on the whole (concatenated) set."""
    p = pred.reshape(-1)
    t = target.reshape(-1)
    keep = t != ignore_index
    p, t = p[keep], t[keep]
    ious = []
    for c in range(num_classes):
        inter = np.sum((p == c) & (t == c))
        union = np.sum((p == c) | (t == c))
        ious.append(inter / union * 100 if union > 0 else np.nan)
    ious = np.array(ious)
    return {"mIoU": np.nanmean(ious), "pixAcc": np.mean(p == t) * 100, "IoU": ious}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k], dtype=float), np.asarray(b[k], dtype=float), err_msg=k)


def test_hand_computed_example():
    # valid (target, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,0); one ignored pixel predicted as 0.
    target = torch.tensor([[[0, 0, 1], [1, 255, 2]]])
    pred = torch.tensor([[[0, 1, 1], [1, 0, 0]]])
    m = SegmentationMetric(num_classes=4)
    m.update(pred, target)
    r = m.compute()
    # class 0: tp 1, union 3; class 1: tp 2, union 3; class 2: tp 0, union 1; class 3 absent everywhere.
    assert r["IoU"][:3] == pytest.approx([100 / 3, 200 / 3, 0.0])
    assert math.isnan(r["IoU"][3])
    assert len(r["IoU"]) == 4
    assert r["mIoU"] == pytest.approx(100.0 / 3)  # mean over classes 0..2 only
    assert r["pixAcc"] == pytest.approx(60.0)
    assert m.confusion.dtype == torch.int64
    assert m.confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


def test_class_only_in_prediction_counts_in_mean():
    target = torch.tensor([[[0, 0], [1, 1]]])
    pred = torch.tensor([[[0, 2], [1, 1]]])  # class 2 predicted, never in the target
    m = SegmentationMetric(3)
    m.update(pred, target)
    r = m.compute()
    assert r["IoU"] == pytest.approx([50.0, 100.0, 0.0])
    assert r["mIoU"] == pytest.approx(50.0)
    assert r["pixAcc"] == pytest.approx(75.0)


def test_custom_ignore_index():
    target = torch.tensor([[[-1, 0], [1, -1]]])
    pred = torch.tensor([[[1, 0], [0, 1]]])
    m = SegmentationMetric(2, ignore_index=-1)
    m.update(pred, target)
    r = m.compute()
    assert r["pixAcc"] == pytest.approx(50.0)
    assert r["IoU"] == pytest.approx([50.0, 0.0])


def _random_set(seed, n=13, h=9, w=11, c=5):
    g = np.random.default_rng(seed)
    target = g.integers(0, c, size=(n, h, w))
    target[g.random(target.shape) < 0.1] = 255
    target[target == 3] = 4  # class 3 never in the target ...
    noise = g.integers(0, c, size=target.shape)
    pred = np.where(g.random(target.shape) < 0.6, np.clip(target, 0, c - 1), noise)
    pred[pred == 3] = 2  # ... nor predicted: it must be left out of the mean
    return pred, target


def test_random_against_numpy():
    pred, target = _random_set(0)
    m = SegmentationMetric(5)
    for i in range(0, len(pred), 4):
        m.update(torch.from_numpy(pred[i:i + 4]), torch.from_numpy(target[i:i + 4]))
    r = m.compute()
    ref = _np_seg(pred, target, 5)
    assert math.isnan(r["IoU"][3])
    np.testing.assert_allclose(r["IoU"], ref["IoU"], rtol=1e-12)
    assert r["mIoU"] == pytest.approx(ref["mIoU"], rel=1e-12)
    assert r["pixAcc"] == pytest.approx(ref["pixAcc"], rel=1e-12)


def test_batch_size_does_not_matter():
    pred, target = _random_set(1, n=14)
    results = []
    for bs in (1, 7, 14):
        m = SegmentationMetric(5)
        for i in range(0, len(pred), bs):
            m.update(torch.from_numpy(pred[i:i + bs]), torch.from_numpy(target[i:i + bs]))
        results.append(m.compute())
    _same(results[0], results[1])
    _same(results[0], results[2])


def test_compute_does_not_mutate_and_reset():
    pred, target = _random_set(2)
    m = SegmentationMetric(5)
    m.update(torch.from_numpy(pred[:6]), torch.from_numpy(target[:6]))
    _same(m.compute(), m.compute())
    m.update(torch.from_numpy(pred[6:]), torch.from_numpy(target[6:]))
    ref = _np_seg(pred, target, 5)
    assert m.compute()["mIoU"] == pytest.approx(ref["mIoU"], rel=1e-12)
    m.reset()
    assert int(m.confusion.sum()) == 0
    m.update(torch.from_numpy(pred[:2]), torch.from_numpy(target[:2]))
    assert m.compute()["pixAcc"] == pytest.approx(_np_seg(pred[:2], target[:2], 5)["pixAcc"])


def test_all_ignored_returns_nan_without_error():
    m = SegmentationMetric(3)
    r = m.compute()  # nothing seen at all
    assert math.isnan(r["mIoU"]) and math.isnan(r["pixAcc"]) and all(math.isnan(x) for x in r["IoU"])
    m.update(torch.zeros(2, 4, 4, dtype=torch.long), torch.full((2, 4, 4), 255))
    r = m.compute()
    assert math.isnan(r["mIoU"]) and math.isnan(r["pixAcc"]) and len(r["IoU"]) == 3
    # an all-ignored batch among valid ones changes nothing
    m.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 0]]]))
    assert m.compute()["pixAcc"] == pytest.approx(50.0)


@pytest.mark.parametrize("bad", [7, -3, 254])
def test_bad_target_value_raises_naming_it(bad):
    m = SegmentationMetric(5)
    target = torch.tensor([[[0, bad], [255, 1]]])
    with pytest.raises(ValueError, match=rf"\[{bad}\].*\[0, 5\)"):
        m.update(torch.zeros_like(target), target)
    assert int(m.confusion.sum()) == 0  # nothing half-accumulated


def test_bad_prediction_and_shapes_raise():
    m = SegmentationMetric(3)
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"pred_labels value\(s\) \[3\]"):
        m.update(torch.tensor([[[0, 3], [1, 1]]]), target)
    with pytest.raises(ValueError, match="argmax"):
        m.update(torch.zeros(1, 3, 2, 2), target)
    with pytest.raises(ValueError, match="integer"):
        m.update(torch.zeros(1, 2, 2), target)
    # a prediction out of range where the target is ignored is not an error
    m.update(torch.tensor([[[0, 99]]]), torch.tensor([[[0, 255]]]))
    assert m.compute()["pixAcc"] == pytest.approx(100.0)
