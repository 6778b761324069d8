"""The FCOS detection head, its target assignment and loss against plain per-point references, its
decoding, and that a tiny model learns the synthetic scenes' boxes."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from mtvision.data import collate_samples
from mtvision.data.synthetic import SyntheticScenes
from mtvision.evaluation import DetectionMetric
from mtvision.losses import FCOSLoss, fcos_targets
from mtvision.models import build_model
from mtvision.models.heads import FCOSHead, decode_detections, split_detection_output

from ..multiprocess import gloo_process_group, run_two_processes

C = 3
STRIDES = [8, 16, 32]


def tiny_detector(num_classes=6):
    torch.manual_seed(0)
    return build_model({"backbone": {"name": "test_resnet"}, "neck": {"name": "fpn", "out_channels": 16},
                        "heads": {"det": {"name": "fcos", "num_classes": num_classes, "channels": 16,
                                          "num_convs": 2}}})


def random_output(B, sizes, generator, num_classes=C):
    """An FCOS-shaped output ``[B, A, C + 8]`` with random logits and distances at the real points."""
    head = FCOSHead(16, [4, *STRIDES], num_classes, channels=8, num_convs=0)
    feats = [torch.randn(B, 16, math.ceil(sizes[0] / s), math.ceil(sizes[1] / s), generator=generator)
             for s in [4, *STRIDES]]
    with torch.no_grad():
        out = head(feats, sizes)
    logits, _, _, points, strides = split_detection_output(out)
    out[..., :num_classes] = torch.randn(logits.shape, generator=generator)
    out[..., num_classes:num_classes + 4] = torch.rand(B, out.shape[1], 4, generator=generator) * 60
    out[..., num_classes + 4] = torch.randn(B, out.shape[1], generator=generator)
    return out


def random_boxes(n, size, generator):
    h, w = size
    xy = torch.rand(n, 2, generator=generator) * torch.tensor([w * 0.8, h * 0.8])
    wh = 4 + torch.rand(n, 2, generator=generator) * torch.tensor([w * 0.6, h * 0.6])
    boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([float(w), float(h)]))], dim=1)
    return boxes, torch.randint(0, C, (n,), generator=generator)


# --------------------------------------------------------------------------- head


def test_head_output_columns_points_and_strides():
    model = tiny_detector().eval()
    head = model.heads["det"]
    assert head.strides == [8, 16, 32]
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 80))["det"]
    assert out.dtype == torch.float32
    assert out.shape == (2, 8 * 10 + 4 * 5 + 2 * 3, 6 + 8)
    logits, dist_, _, points, strides = split_detection_output(out)
    assert bool((dist_ >= 0).all())
    # focal-loss initialisation: every class starts at probability ~0.01
    assert torch.sigmoid(logits).mean().item() == pytest.approx(0.01, abs=0.005)
    # finest level first, row-major, points at the cells' centres
    assert strides[0, :80].eq(8).all() and strides[0, 80:100].eq(16).all() and strides[0, 100:].eq(32).all()
    assert points[0, 0].tolist() == [4.0, 4.0] and points[0, 1].tolist() == [12.0, 4.0]
    assert points[0, 10].tolist() == [4.0, 12.0] and points[1, 80].tolist() == [8.0, 8.0]


def test_head_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        FCOSHead(16, STRIDES, 0)
    with pytest.raises(ValueError, match="min_stride 64"):
        FCOSHead(16, STRIDES, 3, min_stride=64)
    with pytest.raises(ValueError, match="equal on the levels"):
        FCOSHead([16, 32, 32], STRIDES, 3)


# --------------------------------------------------------------------------- targets and loss


def reference_targets(points, strides, boxes, labels, num_classes, level_strides, radius=1.5):
    """Per point, in float64 Python: FCOS's assignment as its docstring states it."""
    A = points.shape[0]
    out_labels, out_ltrb, out_ctr = [], [], []
    for a in range(A):
        x, y, s = float(points[a, 0]), float(points[a, 1]), float(strides[a])
        k = level_strides.index(s)
        lo = 0.0 if k == 0 else 8.0 * level_strides[k - 1]
        hi = math.inf if k == len(level_strides) - 1 else 8.0 * s
        best, best_area = None, math.inf
        for j, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
            ltrb = (x - x1, y - y1, x2 - x, y2 - y)
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            if (min(ltrb) > 0 and abs(x - cx) < radius * s and abs(y - cy) < radius * s
                    and lo < max(ltrb) <= hi and (x2 - x1) * (y2 - y1) < best_area):
                best, best_area = j, (x2 - x1) * (y2 - y1)
        if best is None:
            out_labels.append(num_classes)
            out_ctr.append(0.0)
            out_ltrb.append(None)
        else:
            x1, y1, x2, y2 = boxes[best].tolist()
            l, t, r, b = x - x1, y - y1, x2 - x, y2 - y
            out_labels.append(int(labels[best]))
            out_ltrb.append((l, t, r, b))
            out_ctr.append(math.sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)))
    return out_labels, out_ltrb, out_ctr


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_assignment_matches_the_per_point_reference(seed):
    g = torch.Generator().manual_seed(seed)
    size = (96, 128)
    out = random_output(2, size, g)
    _, _, _, points, strides = split_detection_output(out)
    boxes, labels = zip(*[random_boxes(n, size, g) for n in (5, 0)])
    level_strides = [4.0, 8.0, 16.0, 32.0]
    got_labels, got_ltrb, got_ctr = fcos_targets(points, strides, boxes, labels, C, level_strides)
    for b in range(2):
        ref_labels, ref_ltrb, ref_ctr = reference_targets(points[b], strides[b], boxes[b], labels[b], C,
                                                          level_strides)
        assert got_labels[b].tolist() == ref_labels
        assert got_ctr[b].tolist() == pytest.approx(ref_ctr, abs=1e-5)
        for a, ltrb in enumerate(ref_ltrb):
            if ltrb is not None:
                assert got_ltrb[b, a].tolist() == pytest.approx(ltrb, abs=1e-4)
    assert (got_labels[0] < C).sum() > 0 and (got_labels[1] == C).all()  # positives; none without boxes


def reference_loss(out, boxes, labels, level_strides):
    """The loss from its definition, with boolean indexing over the positives."""
    logits, dist_, ctr, points, strides = split_detection_output(out)
    tl, tltrb, tctr = fcos_targets(points, strides, boxes, labels, C, level_strides)
    pos = tl < C
    n = max(float(pos.sum()), 1.0)
    onehot = F.one_hot(tl, C + 1)[..., :C].float()
    cls = sigmoid_focal_loss(logits, onehot, 0.25, 2.0, reduction="sum") / n
    p = points[pos]
    pred = torch.cat([p - dist_[pos][:, :2], p + dist_[pos][:, 2:]], 1)
    target = torch.cat([p - tltrb[pos][:, :2], p + tltrb[pos][:, 2:]], 1)
    w = tctr[pos]
    box = (generalized_box_iou_loss(pred, target, reduction="none") * w).sum() / max(float(w.sum()), 1e-6)
    ctr_loss = F.binary_cross_entropy_with_logits(ctr[pos], w, reduction="sum") / n
    return cls + box + ctr_loss


def test_loss_matches_its_definition_and_has_finite_gradients():
    g = torch.Generator().manual_seed(3)
    size = (96, 128)
    out = random_output(3, size, g).requires_grad_()
    boxes, labels = zip(*[random_boxes(n, size, g) for n in (4, 1, 0)])
    loss = FCOSLoss(C, [4, 8, 16, 32])(out, list(boxes), list(labels))
    expected = reference_loss(out.detach(), boxes, labels, [4.0, 8.0, 16.0, 32.0])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(out.grad).all()
    assert out.grad[..., C + 5:].abs().sum() == 0  # the constant columns get nothing


def test_loss_without_any_box_is_the_classification_term():
    g = torch.Generator().manual_seed(4)
    out = random_output(2, (64, 64), g)
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    no_labels = [torch.zeros(0, dtype=torch.long)] * 2
    loss = FCOSLoss(C, [4, 8, 16, 32])(out, empty, no_labels)
    logits = out[..., :C]
    background = sigmoid_focal_loss(logits, torch.zeros_like(logits), reduction="sum")
    assert loss.item() == pytest.approx(background.item(), rel=1e-5)


def test_loss_rejects_bad_targets():
    out = random_output(1, (64, 64), torch.Generator().manual_seed(5))
    loss = FCOSLoss(C, [4, 8, 16, 32])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        loss(out, [torch.tensor([[0.0, 0.0, 10.0, 10.0]])], [torch.tensor([3])])
    with pytest.raises(ValueError, match=r"boxes must be \[N, 4\]"):
        loss(out, [torch.zeros(2, 5)], [torch.zeros(2, dtype=torch.long)])
    with pytest.raises(ValueError, match="1 images but 2 box"):
        loss(out, [torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.long)] * 2)
    with pytest.raises(ValueError, match="built for 4"):
        FCOSLoss(4, [8])(out, [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)])


def _loss_worker(rank, init_file, out_dir):
    with gloo_process_group(rank, init_file):
        out, boxes, labels = _global_batch()
        half = slice(0, 1) if rank == 0 else slice(1, 4)  # uneven shares of the global batch
        local = out[half].clone().requires_grad_()
        loss = FCOSLoss(C, [4, 8, 16, 32])(local, boxes[half], labels[half])
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": local.grad}, os.path.join(out_dir, f"rank{rank}.pt"))


def _global_batch():
    g = torch.Generator().manual_seed(6)
    out = random_output(4, (64, 96), g)
    boxes, labels = zip(*[random_boxes(n, (64, 96), g) for n in (3, 0, 2, 5)])
    return out, list(boxes), list(labels)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_processes_give_the_global_batch_gradient(tmp_path):
    """Under DDP (gradients averaged over 2 processes) the normalisers are global: the averaged gradient
    equals the one-process gradient of the loss on the whole batch."""
    run_two_processes(_loss_worker, tmp_path)
    out, boxes, labels = _global_batch()
    out.requires_grad_()
    FCOSLoss(C, [4, 8, 16, 32])(out, boxes, labels).backward()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    averaged = torch.cat([r0["grad"], r1["grad"]]) / 2  # what DDP's all-reduce (mean) does
    torch.testing.assert_close(averaged, out.grad, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- decoding


def _output_with(points_xy, dists, class_logits, ctr_logits, stride=8.0):
    A = len(points_xy)
    out = torch.zeros(1, A, C + 8)
    out[0, :, :C] = torch.tensor(class_logits, dtype=torch.float32)
    out[0, :, C:C + 4] = torch.tensor(dists, dtype=torch.float32)
    out[0, :, C + 4] = torch.tensor(ctr_logits, dtype=torch.float32)
    out[0, :, C + 5:C + 7] = torch.tensor(points_xy, dtype=torch.float32)
    out[0, :, C + 7] = stride
    return out


def test_decoding_boxes_scores_nms_and_clipping():
    big, small = 5.0, -9.0
    out = _output_with(
        points_xy=[[20, 20], [22, 20], [60, 40], [5, 5]],
        dists=[[10, 10, 10, 10], [12, 10, 8, 10], [4, 4, 4, 4], [10, 10, 10, 10]],
        class_logits=[[big, small, small], [big - 1, small, small], [small, big, small],
                      [small, small, small]],
        ctr_logits=[big, big, 0.0, big])
    det = decode_detections(out, image_size=(48, 64), nms_threshold=0.5)[0]
    # point 1 duplicates point 0 (IoU > 0.5, same class, lower score): suppressed; point 3 is below threshold
    assert det["labels"].tolist() == [0, 1]
    torch.testing.assert_close(det["boxes"], torch.tensor([[10.0, 10.0, 30.0, 30.0],
                                                           [56.0, 36.0, 64.0, 44.0]]))
    p_big = torch.sigmoid(torch.tensor(big)).item()
    assert det["scores"][0].item() == pytest.approx(p_big, rel=1e-6)  # sqrt(p * p)
    assert det["scores"][1].item() == pytest.approx(math.sqrt(p_big * 0.5), rel=1e-6)  # centerness logit 0
    one = decode_detections(out, image_size=(48, 64), max_detections=1)[0]
    assert one["labels"].tolist() == [0]
    unclipped = decode_detections(out)[0]
    assert unclipped["boxes"][:, 2].max().item() == pytest.approx(64.0)  # 60 + 4: inside anyway
    assert decode_detections(out, score_threshold=0.999)[0]["boxes"].shape == (0, 4)


# --------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_tiny_model_learns_the_boxes_of_a_few_scenes():
    """Overfitting four synthetic scenes: the decoded boxes find their objects (AP50 far above chance)."""
    torch.manual_seed(0)
    model = tiny_detector()
    scenes = SyntheticScenes(4, size=(64, 80), seed=0)
    batch = collate_samples([scenes[i] for i in range(4)])
    head = model.heads["det"]
    loss_fn = FCOSLoss(6, head.strides)
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    model.train()
    first = None
    for _ in range(60):
        loss = loss_fn(model(batch["image"])["det"], batch["boxes"], batch["labels"])
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    model.eval()
    with torch.no_grad():
        dets = head.predict(model(batch["image"])["det"], (64, 80))
    metric = DetectionMetric(6)
    metric.update(dets, [{"boxes": b, "labels": lab} for b, lab in zip(batch["boxes"], batch["labels"])])
    result = metric.compute()
    assert result["AP50"] > 50.0
    best = [float(box_iou(d["boxes"], t).max()) for d, t in zip(dets, batch["boxes"]) if len(t)]
    assert min(best) > 0.5


def test_extra_levels_give_fcos_p3_to_p7():
    head = FCOSHead(16, [4, 8, 16, 32], 3, channels=8, num_convs=1, extra_levels=2)
    assert head.strides == [8, 16, 32, 64, 128] and len(head.scales) == 5
    feats = [torch.randn(1, 16, 256 // s, 320 // s) for s in (4, 8, 16, 32)]
    out = head(feats, (256, 320))
    sizes = [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]  # a stride-2 conv rounds up
    assert out.shape == (1, sum(h * w for h, w in sizes), 3 + 8)
    _, _, _, points, strides = split_detection_output(out)
    assert strides[0, -6:].eq(128).all() and points[0, -1].tolist() == [320.0, 192.0]
    # the P6/P7 convs learn: a box only the coarsest level may take gives them a gradient
    big = [torch.tensor([[0.0, 0.0, 320.0, 256.0]])]
    FCOSLoss(3, head.strides)(out, big, [torch.tensor([1])]).backward()
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in head.extra)
    with pytest.raises(ValueError, match="extra_levels"):
        FCOSHead(16, STRIDES, 3, extra_levels=-1)
