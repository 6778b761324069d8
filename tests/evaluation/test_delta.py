import math

import pytest
import torch

from mtvision.evaluation import (
    HIGHER_IS_BETTER,
    DepthMetric,
    NormalMetric,
    SegmentationMetric,
    delta_m,
    relative_changes,
)

BASE = {"seg/mIoU": 40.0, "depth/abs_err": 0.5, "normal/within_11.25": 20.0}


def test_hand_computed_worse_model_is_positive():
    # mIoU +10% (better: -10), abs_err +20% (worse: +20), within_11.25 -25% (worse: +25)
    res = {"seg/mIoU": 44.0, "depth/abs_err": 0.6, "normal/within_11.25": 15.0, "seg/pixAcc": 1.0}
    terms = relative_changes(res, BASE)
    assert list(terms) == list(BASE)  # extra result keys ignored, baseline order kept
    assert terms == pytest.approx({"seg/mIoU": -10.0, "depth/abs_err": 20.0, "normal/within_11.25": 25.0})
    assert delta_m(res, BASE) == pytest.approx(35.0 / 3)


def test_better_model_is_negative_and_baseline_is_zero():
    res = {"seg/mIoU": 44.0, "depth/abs_err": 0.4, "normal/within_11.25": 25.0}
    assert delta_m(res, BASE) == pytest.approx((-10.0 - 20.0 - 25.0) / 3)
    assert delta_m(BASE, BASE) == 0.0


def test_explicit_directions_and_nested_dicts():
    res = {"seg": {"mIoU": 44.0}, "depth": {"abs_err": 0.6}, "normal": {"within_11.25": 15.0}}
    assert delta_m(res, BASE) == pytest.approx(35.0 / 3)
    # overriding one key by full name flips only that term; by last component works too
    flipped = relative_changes(res, BASE, {"seg/mIoU": False})
    assert flipped["seg/mIoU"] == pytest.approx(10.0) and flipped["depth/abs_err"] == pytest.approx(20.0)
    assert relative_changes(res, BASE, {"abs_err": True})["depth/abs_err"] == pytest.approx(-20.0)
    # a metric unknown to the table needs an explicit direction
    with pytest.raises(ValueError, match="'det/mystery'"):
        delta_m({"det/mystery": 2.0}, {"det/mystery": 1.0})
    assert delta_m({"det/mystery": 2.0}, {"det/mystery": 1.0}, {"det/mystery": True}) == pytest.approx(-100.0)


def test_errors_name_the_key():
    with pytest.raises(ValueError, match="'depth/abs_err'.*missing"):
        delta_m({"seg/mIoU": 1.0}, {"seg/mIoU": 1.0, "depth/abs_err": 0.5})
    with pytest.raises(ValueError, match="'depth/rmse'.*0"):
        delta_m({"depth/rmse": 1.0}, {"depth/rmse": 0.0})
    with pytest.raises(ValueError, match="'seg/mIoU'.*nan"):
        delta_m({"seg/mIoU": math.nan}, {"seg/mIoU": 40.0})
    with pytest.raises(ValueError, match="'seg/IoU'.*number"):
        delta_m({"seg/IoU": [1.0]}, {"seg/IoU": [2.0]})
    with pytest.raises(ValueError, match="empty"):
        delta_m({}, {})


def test_table_covers_every_metric_key():
    seg = SegmentationMetric(2)
    seg.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 1]]]))
    depth = DepthMetric()
    depth.update(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))
    normal = NormalMetric()
    normal.update(torch.ones(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
    results = {}
    for task, m in (("seg", seg), ("depth", depth), ("normal", normal)):
        for k, v in m.compute().items():
            if k != "IoU":  # the per-class list is not a scalar metric
                assert k in HIGHER_IS_BETTER, k
                results[f"{task}/{k}"] = v
    assert len(results) == 2 + 7 + 6
    baselines = {k: v for k, v in results.items() if v != 0}
    assert delta_m(results, baselines) == 0.0
