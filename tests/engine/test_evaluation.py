"""Evaluation loop, model-selection score, trivial baseline and pictures."""

import math

import numpy as np
import pytest
import torch

from mtvision.engine import TrivialPredictor, evaluate, fit_trivial_baseline, primary_score, trivial_baseline
from mtvision.engine.visualize import (LABEL_HEIGHT, PALETTE, colorize_depth, colorize_normal, colorize_seg,
                                       denormalize, labelled_row)


def _batches():
    # Two batches of 1x2x2 maps: classes 0,0,1,255 and 2,2,2,2 -> majority 2 (4 of 7 valid pixels).
    seg = [torch.tensor([[[0, 0], [1, 255]]]), torch.tensor([[[2, 2], [2, 2]]])]
    depth = [torch.tensor([[[[1.0, 2.0], [0.0, 3.0]]]]), torch.tensor([[[[4.0, 0.0], [0.0, 0.0]]]])]
    normal = [torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)]
    normal[0][0, 2] = -1.0  # facing the camera
    normal[1][0, 0, 0, 0] = 1.0
    return [{"image": torch.zeros(1, 3, 2, 2), "seg": s, "depth": d, "normal": n}
            for s, d, n in zip(seg, depth, normal)]


def test_trivial_baseline_statistics_and_metrics():
    pred = fit_trivial_baseline(_batches(), ["seg", "depth", "normal"], num_classes=3)
    assert pred.majority_class == 2
    assert pred.mean_depth == pytest.approx(10.0 / 4)
    expected_normal = np.array([1.0, 0.0, -4.0]) / math.sqrt(17.0)
    assert pred.mean_normal == pytest.approx(tuple(expected_normal))

    metrics, _ = trivial_baseline(_batches(), _batches(), ["seg", "depth", "normal"], num_classes=3)
    # seg: predict 2 everywhere -> 4 of 7 valid pixels right; IoU(2) = 4/7, IoU(0) = IoU(1) = 0.
    assert metrics["seg/pixAcc"] == pytest.approx(4 / 7 * 100)
    assert metrics["seg/mIoU"] == pytest.approx(4 / 7 * 100 / 3)
    assert metrics["depth/abs_err"] == pytest.approx((1.5 + 0.5 + 0.5 + 1.5) / 4)


def test_evaluate_is_independent_of_batching():
    g = torch.Generator().manual_seed(0)
    samples = [{"image": torch.randn(1, 3, 4, 5, generator=g),
                "seg": torch.randint(0, 3, (1, 4, 5), generator=g),
                "depth": torch.rand(1, 1, 4, 5, generator=g) + 0.5,
                "normal": torch.nn.functional.normalize(torch.randn(1, 3, 4, 5, generator=g), dim=1)}
               for _ in range(6)]

    def predict(x):  # deterministic function of the image
        return {"seg": x[:, :3], "depth": x[:, :1].abs() + 0.1, "normal": x}

    def batched(n):
        return [{k: torch.cat([s[k] for s in samples[i:i + n]]) for k in samples[0]} for i in range(0, 6, n)]

    tasks = ["seg", "depth", "normal"]
    a, b = evaluate(predict, batched(1), tasks, 3), evaluate(predict, batched(4), tasks, 3)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-9), k


def test_primary_score_ranks_by_geometric_mean_of_ratios():
    tasks = ["seg", "depth", "normal"]
    base = {"seg/mIoU": 50.0, "depth/abs_err": 1.0, "normal/mean": 30.0}
    better_seg = {**base, "seg/mIoU": 60.0}
    worse_depth = {**base, "depth/abs_err": 1.1}
    assert primary_score(better_seg, tasks) > primary_score(base, tasks) > primary_score(worse_depth, tasks)
    # +20% mIoU and +10% depth error: (1.2 / 1.1) > 1 -> still better overall.
    assert primary_score({**better_seg, "depth/abs_err": 1.1}, tasks) > primary_score(base, tasks)
    assert primary_score({**base, "normal/mean": float("nan")}, tasks) == -math.inf
    assert primary_score({"depth/abs_err": 0.5}, ["depth"]) > primary_score({"depth/abs_err": 0.6}, ["depth"])


def test_trivial_predictor_shapes():
    predictor = TrivialPredictor(4, majority_class=3, mean_depth=2.0, mean_normal=(0.0, 0.0, -1.0))
    out = predictor(torch.zeros(2, 3, 5, 6))
    assert out["seg"].shape == (2, 4, 5, 6) and bool((out["seg"].argmax(1) == 3).all())
    assert out["depth"].shape == (2, 1, 5, 6) and bool((out["depth"] == 2.0).all())
    assert out["normal"].shape == (2, 3, 5, 6)


def test_colour_maps():
    seg = torch.tensor([[0, 1], [5, 255]])
    rgb = colorize_seg(seg)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert (rgb[0, 0] == PALETTE[0]).all() and (rgb[1, 1] == 0).all()
    assert len({tuple(c) for c in PALETTE[:20]}) == 20  # distinct class colours

    n = torch.zeros(3, 1, 2)
    n[:, 0, 0] = torch.tensor([0.0, 0.0, -2.0])  # raw, normalised inside; (0,0,-1) -> (0.5, 0.5, 0)
    out = colorize_normal(n)
    assert tuple(out[0, 0]) == (128, 128, 0) and tuple(out[0, 1]) == (0, 0, 0)

    d = colorize_depth(torch.tensor([[[1.0, 2.0, 0.0]]]))
    assert d.shape == (1, 3, 3) and tuple(d[0, 2]) == (0, 0, 0) and tuple(d[0, 0]) != tuple(d[0, 1])

    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    img = denormalize(torch.full((3, 2, 2), 2.0), mean, std)
    assert img.dtype == np.uint8 and (img == 255).all()

    row = labelled_row([("a", rgb), ("b", rgb), ("c", rgb)])
    assert row.shape == (2 + LABEL_HEIGHT, 6, 3)
