"""DetectionMetric (COCO box AP via pycocotools): hand-computed cases, a float64 reference, distribution."""

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from mtvision.evaluation import HIGHER_IS_BETTER, DetectionMetric

from ..multiprocess import gloo_process_group, run_two_processes

# pycocotools' precision is tp / (tp + fp + eps) with eps = 2.2e-16, so a perfect AP is 100 - 2e-14.
EPS = 1e-9
KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _pred(boxes, scores, labels):
    return {"boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.as_tensor(scores, dtype=torch.float32).reshape(-1),
            "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1)}


def _target(boxes, labels):
    return {"boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1)}


def _run(preds, targets, num_classes=3, **kw):
    m = DetectionMetric(num_classes, **kw)
    m.update(preds, targets)
    return m.compute()


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k], dtype=float), np.asarray(b[k], dtype=float), err_msg=k)


def _random_scene(n_images=6, num_classes=3, seed=0):
    """Large boxes of several classes, detections = jittered targets + false positives, distinct scores."""
    rng = np.random.default_rng(seed)
    preds, targets = [], []
    for _ in range(n_images):
        n = int(rng.integers(0, 5))
        xy = rng.uniform(0, 300, (n, 2))
        gt = np.concatenate([xy, xy + rng.uniform(100, 200, (n, 2))], 1)
        gl = rng.integers(0, num_classes, n)
        keep = rng.random(n) < 0.8
        fp_n = int(rng.integers(0, 3))
        fxy = rng.uniform(0, 300, (fp_n, 2))
        det = np.concatenate([gt[keep] + rng.normal(0, 12, (int(keep.sum()), 4)),
                              np.concatenate([fxy, fxy + rng.uniform(100, 200, (fp_n, 2))], 1)])
        dl = np.concatenate([gl[keep], rng.integers(0, num_classes, fp_n)])
        preds.append(_pred(det, rng.random(len(det)), dl))
        targets.append(_target(gt, gl))
    return preds, targets


# --------------------------------------------------------------------------- float64 reference (one class)

def _iou(a, b):
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _ref_ap(gts, dets, thr):
    """COCO AP (percent) of one class at one IoU threshold.

    ``gts[i]``: list of xyxy boxes of image i; ``dets[i]``: list of (score, xyxy box). Detections are
    taken by descending score; each is matched to the unmatched target of its image with the highest
    IoU >= thr (a target is matched at most once); precision is made monotone (non-increasing in rank)
    and read at COCO's 101 recall thresholds (0 where that recall is never reached).
    """
    npos = sum(len(g) for g in gts)
    order = sorted(((s, i, box) for i, d in enumerate(dets) for s, box in d), key=lambda x: -x[0])
    matched = [[False] * len(g) for g in gts]
    tp = []
    for _, i, box in order:
        best, best_iou = -1, thr
        for g, gbox in enumerate(gts[i]):
            if matched[i][g]:
                continue
            iou = _iou(box, gbox)
            if iou >= best_iou:
                best, best_iou = g, iou
        if best >= 0:
            matched[i][best] = True
        tp.append(1.0 if best >= 0 else 0.0)
    ctp = np.cumsum(tp)
    recall = ctp / npos
    precision = ctp / np.arange(1, len(tp) + 1)
    for k in range(len(precision) - 2, -1, -1):
        precision[k] = max(precision[k], precision[k + 1])
    total = 0.0
    for r in np.linspace(0.0, 1.0, 101):  # COCO's recall thresholds, exactly as it builds them
        reached = np.flatnonzero(recall >= r)
        total += precision[reached[0]] if reached.size else 0.0
    return total / 101 * 100.0


@pytest.mark.parametrize("seed", range(6))
def test_matches_float64_reference_single_class(seed):
    rng = np.random.default_rng(100 + seed)
    n_images = int(rng.integers(3, 8))
    gts, dets, preds, targets = [], [], [], []
    scores = iter(rng.permutation(1000) / 1000.0 + 1e-3)  # distinct: no tie-order ambiguity
    for _ in range(n_images):
        n = int(rng.integers(0, 6))
        xy = rng.uniform(0, 400, (n, 2))
        gt = np.concatenate([xy, xy + rng.uniform(120, 250, (n, 2))], 1)  # all large (> 96²)
        det = []
        for box in gt:
            for _ in range(int(rng.integers(0, 3))):  # missed, detected, or detected twice
                d = box + rng.normal(0, 20, 4)
                d[2:] = np.maximum(d[2:], d[:2] + 100)  # stays large
                det.append(d)
        for _ in range(int(rng.integers(0, 4))):  # false positives
            fxy = rng.uniform(0, 400, 2)
            det.append(np.concatenate([fxy, fxy + rng.uniform(120, 250, 2)]))
        det = np.asarray(det, dtype=np.float64).reshape(-1, 4)
        sc = np.array([next(scores) for _ in range(len(det))])
        gts.append(gt.tolist())
        dets.append(list(zip(sc.tolist(), det.tolist())))
        preds.append({"boxes": torch.from_numpy(det), "scores": torch.from_numpy(sc),
                      "labels": torch.zeros(len(det), dtype=torch.int64)})
        targets.append({"boxes": torch.from_numpy(gt), "labels": torch.zeros(n, dtype=torch.int64)})
    if sum(len(g) for g in gts) == 0:  # keep the case meaningful
        gts[0] = [[0.0, 0.0, 150.0, 150.0]]
        targets[0] = _target(gts[0], [0])
    r = _run(preds, targets, num_classes=1)
    ref50, ref75 = _ref_ap(gts, dets, 0.5), _ref_ap(gts, dets, 0.75)
    assert r["AP50"] == pytest.approx(ref50, abs=1e-6)
    assert r["AP75"] == pytest.approx(ref75, abs=1e-6)
    assert 0.0 < ref75 < ref50 < 100.0  # non-trivial cases
    assert r["classAP"] == [r["AP"]] and r["AP"] == r["APl"]
    assert math.isnan(r["APs"]) and math.isnan(r["APm"])


# --------------------------------------------------------------------------- hand-computed cases

def test_perfect_predictions():
    boxes = [[[10, 20, 150, 200], [0, 0, 40, 30]], [[50, 50, 60, 70]], [[5, 5, 300, 300], [100, 0, 200, 90]]]
    labels = [[0, 1], [3], [0, 3]]
    preds = [_pred(b, [1.0] * len(b), lab) for b, lab in zip(boxes, labels)]
    targets = [_target(b, lab) for b, lab in zip(boxes, labels)]
    m = DetectionMetric(num_classes=4)
    m.update(preds, targets)
    r = m.compute()
    assert set(r) == set(KEYS) | {"classAP"}
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert r[k] == pytest.approx(100.0, abs=EPS), k
    assert r["classAP"][0] == pytest.approx(100.0, abs=EPS)
    assert r["classAP"][1] == pytest.approx(100.0, abs=EPS)
    assert math.isnan(r["classAP"][2])  # class 2 never in the targets
    assert r["classAP"][3] == pytest.approx(100.0, abs=EPS)
    _same(m.compute(), r)  # compute() keeps the state
    m.reset()
    assert math.isnan(m.compute()["AP"])
    assert all(HIGHER_IS_BETTER[k] for k in KEYS)


def test_iou_exactly_0_6_passes_three_of_ten_thresholds():
    # target 100x100, detection its top 100x60: intersection 6000, union 10000, IoU 0.6 exactly
    r = _run([_pred([0, 0, 100, 60], [0.9], [1])], [_target([0, 0, 100, 100], [1])])
    assert r["AP50"] == pytest.approx(100.0, abs=EPS)
    assert r["AP75"] == 0.0
    assert r["AP"] == pytest.approx(30.0, abs=EPS)  # thresholds 0.50, 0.55, 0.60 of 0.50:0.05:0.95
    assert r["APl"] == pytest.approx(30.0, abs=EPS)  # target area 10000 > 96²: large
    assert math.isnan(r["APs"]) and math.isnan(r["APm"])
    assert math.isnan(r["classAP"][0]) and math.isnan(r["classAP"][2])


def test_area_ranges():
    targets = [_target([[0, 0, 20, 20], [100, 100, 220, 220]], [0, 0])]  # 400 px² small, 14400 px² large
    preds = [_pred([[100, 100, 220, 220]], [0.8], [0])]
    r = _run(preds, targets, num_classes=1)
    assert r["APl"] == pytest.approx(100.0, abs=EPS)
    assert r["APs"] == 0.0
    assert math.isnan(r["APm"])
    assert r["AP"] == pytest.approx(51 / 101 * 100, abs=EPS)  # recall 0.5: recall points 0.00..0.50


def test_batch_split_invariance():
    preds, targets = _random_scene(n_images=9, seed=3)
    whole = _run(preds, targets)
    m = DetectionMetric(3)
    for lo, hi in ((0, 1), (1, 4), (4, 5), (5, 9)):
        m.update(preds[lo:hi], targets[lo:hi])
    _same(m.compute(), whole)
    assert 0.0 < whole["AP"] < 100.0


def test_input_dtype_does_not_matter():
    preds, targets = _random_scene(n_images=5, seed=7)
    as64 = [{k: v.double() if v.is_floating_point() else v.int() for k, v in d.items()} for d in preds]
    t64 = [{k: v.double() if v.is_floating_point() else v for k, v in d.items()} for d in targets]
    _same(_run(as64, t64), _run(preds, targets))


def test_no_detections_anywhere_is_zero():
    empty = _pred(torch.zeros(0, 4), [], [])
    targets = [_target([[0, 0, 50, 50]], [2]), _target(torch.zeros(0, 4), [])]
    r = _run([empty, empty], targets)
    assert r["AP"] == 0.0 and r["AP50"] == 0.0 and r["AP75"] == 0.0 and r["APm"] == 0.0
    assert math.isnan(r["APs"]) and math.isnan(r["APl"])
    assert math.isnan(r["classAP"][0]) and r["classAP"][2] == 0.0


def test_no_targets_anywhere_is_nan():
    preds = [_pred([[0, 0, 50, 50]], [0.5], [0])]
    r = _run(preds, [_target(torch.zeros(0, 4), [])])
    assert all(math.isnan(r[k]) for k in KEYS)
    assert all(math.isnan(v) for v in r["classAP"])
    assert math.isnan(DetectionMetric(2).compute()["AP"])  # nothing seen at all


def test_image_without_targets_adds_false_positives():
    box = [10, 10, 110, 110]
    preds, targets = [_pred([box], [0.5], [0])], [_target([box], [0])]
    assert _run(preds, targets)["AP"] == pytest.approx(100.0, abs=EPS)
    # a second image without targets, whose detection outscores the true positive: precision 1/2
    preds.append(_pred([[0, 0, 100, 100]], [0.9], [0]))
    targets.append(_target(torch.zeros(0, 4), []))
    r = _run(preds, targets)
    assert r["AP"] == pytest.approx(50.0, abs=EPS)
    assert r["classAP"][0] == pytest.approx(50.0, abs=EPS)
    # scored below the true positive it does not lower AP (recall 1 is reached at precision 1)
    preds[1] = _pred([[0, 0, 100, 100]], [0.1], [0])
    assert _run(preds, targets)["AP"] == pytest.approx(100.0, abs=EPS)


def test_max_detections_counts_the_top_detections_of_each_image():
    a, b = [0, 0, 100, 100], [200, 200, 300, 300]
    # two classes: COCOeval's own maxDets cut is per image and class, the metric's is per image
    targets = [_target([a, b], [0, 1])] * 3
    preds = [_pred([b, a], [0.8, 0.9], [1, 0])] * 3  # class 0's detection scores highest
    assert _run(preds, targets)["AP"] == pytest.approx(100.0, abs=EPS)
    r = _run(preds, targets, max_detections=1)
    assert r["classAP"][0] == pytest.approx(100.0, abs=EPS)
    assert r["classAP"][1] == 0.0
    assert r["AP"] == pytest.approx(50.0, abs=EPS)
    # one class: the top detection finds one of the two targets, recall 1/2 at precision 1
    targets = [_target([a, b], [0, 0])] * 3
    preds = [_pred([a, b], [0.9, 0.8], [0, 0])] * 3
    r = _run(preds, targets, max_detections=1)
    assert r["AP"] == pytest.approx(51 / 101 * 100, abs=EPS)
    assert _run(preds, targets, max_detections=2)["AP"] == pytest.approx(100.0, abs=EPS)


@pytest.mark.parametrize(
    "preds, targets, match",
    [
        ([_pred([[0, 0, 1, 1]], [1.0], [0])], [], r"len\(preds\) = 1 != len\(targets\) = 0"),
        ([{"boxes": torch.zeros(1, 3), "scores": torch.ones(1), "labels": torch.zeros(1, dtype=torch.int64)}],
         [_target([[0, 0, 1, 1]], [0])], r"preds\[0\]\['boxes'\] has shape \(1, 3\)"),
        ([_pred([[0, 0, 1, 1]], [1.0], [0]), _pred([[0, 0, 1, 1]], [1.0, 0.5], [0])],
         [_target([[0, 0, 1, 1]], [0])] * 2, r"preds\[1\]\['scores'\]"),
        ([_pred([[0, 0, 1, 1]], [1.0], [0])], [_target([[0, 0, 1, 1]], [0, 1])], r"targets\[0\]\['labels'\]"),
        ([_pred([[0, 0, 1, 1]], [1.0], [3])], [_target([[0, 0, 1, 1]], [0])],
         r"preds\[0\]\['labels'\] value\(s\) \[3\] outside \[0, 3\)"),
        ([_pred([[0, 0, 1, 1]], [1.0], [0])], [_target([[0, 0, 1, 1]], [-1])], r"targets\[0\]\['labels'\]"),
        ([_pred([[0, 0, 1, 1]], [1.0], [0])], [{"labels": torch.zeros(1, dtype=torch.int64)}],
         r"targets\[0\] has no 'boxes'"),
        ([_pred([[5, 0, 1, 1]], [1.0], [0])], [_target([[0, 0, 1, 1]], [0])],
         r"preds\[0\]\['boxes'\].*x2 < x1"),
        ([{"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.zeros(1)}],
         [_target([[0, 0, 1, 1]], [0])], r"preds\[0\]\['labels'\] must be an integer"),
    ],
)
def test_bad_input_raises_naming_the_field(preds, targets, match):
    m = DetectionMetric(3)
    with pytest.raises(ValueError, match=match):
        m.update(preds, targets)
    assert m.num_images == 0  # a rejected batch stores nothing


@pytest.mark.parametrize("kw", [{"num_classes": 0}, {"num_classes": -2}, {"num_classes": 2.5},
                                {"num_classes": True}, {"num_classes": 3, "max_detections": 0}])
def test_bad_constructor_arguments(kw):
    with pytest.raises(ValueError, match="num_classes|max_detections"):
        DetectionMetric(**kw)


# --------------------------------------------------------------------------- distributed

def _worker(rank, init_file, out_dir):
    with gloo_process_group(rank, init_file):
        preds, targets = _random_scene(n_images=8, seed=11)
        # uneven shards: rank 0 gets images 0..4 in batches of 2, rank 1 images 5..7 one at a time
        lo, hi, bs = (0, 5, 2) if rank == 0 else (5, 8, 1)
        m = DetectionMetric(3)
        for i in range(lo, hi, bs):
            m.update(preds[i:min(i + bs, hi)], targets[i:min(i + bs, hi)])
        first = m.compute()
        second = m.compute()
        torch.save({"first": first, "second": second, "local": m.num_images},
                   os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_gloo_processes_match_one_process(tmp_path):
    run_two_processes(_worker, tmp_path)

    expected = _run(*_random_scene(n_images=8, seed=11))
    assert 0.0 < expected["AP"] < 100.0
    for rank, n_local in ((0, 5), (1, 3)):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        _same(got["first"], expected)
        _same(got["second"], expected)  # compute() neither doubled nor cleared the state
        assert got["local"] == n_local  # the gathered records are not kept
