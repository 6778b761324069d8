"""The FCOS detection loss: target assignment, sigmoid focal loss, GIoU box loss and centerness BCE."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from ..distributed import mean_over_processes
from ..models.heads.detection import split_detection_output

__all__ = ["FCOSLoss", "fcos_targets"]


def _pad_targets(boxes: Sequence[Tensor], labels: Sequence[Tensor], device) -> tuple[Tensor, Tensor, Tensor]:
    """Lists of ``[N_i, 4]`` / ``[N_i]`` -> ``boxes [B, N, 4]``, ``labels [B, N]``, ``valid [B, N]`` on
    ``device`` (N = max N_i, at least 1). Padded where the lists are (the loader's CPU tensors: one copy
    per tensor to the device, not one per image)."""
    lengths = torch.tensor([int(b.shape[0]) for b in boxes], dtype=torch.long)
    n = max(int(lengths.max()) if len(boxes) else 0, 1)
    out_boxes = pad_sequence(list(boxes), batch_first=True)
    out_labels = pad_sequence(list(labels), batch_first=True)
    if out_boxes.shape[1] < n:  # every image without a box
        out_boxes = F.pad(out_boxes, (0, 0, 0, n - out_boxes.shape[1]))
        out_labels = F.pad(out_labels, (0, n - out_labels.shape[1]))
    valid = torch.arange(n) < lengths[:, None]
    return (out_boxes.to(device, torch.float32, non_blocking=True), out_labels.to(device, non_blocking=True),
            valid.to(device, non_blocking=True))


@torch.no_grad()
def fcos_targets(points: Tensor, strides: Tensor, boxes: Sequence[Tensor], labels: Sequence[Tensor],
                 num_classes: int, level_strides: Sequence[float], center_radius: float = 1.5
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """FCOS's assignment of ground-truth boxes to points.

    ``points [B, A, 2]`` (x, y pixels) and ``strides [B, A]`` from the head's output, ``level_strides``
    the head's strides (finest first); ``boxes[i]`` ``[N_i, 4]`` xyxy pixels and ``labels[i]`` ``[N_i]``
    per image. A point is a candidate for a box when it lies inside the box and within ``center_radius``
    strides of its centre (FCOS's centre sampling), and the box's largest distance from it is in its
    level's range ``(8 s_prev, 8 s]`` (the finest level from 0, the coarsest without bound: FCOS's
    64/128/256/512 for strides 8..64). Of several candidate boxes the smallest one wins. No host sync:
    the ranges come from ``level_strides``, not from the data.

    Returns ``labels [B, A]`` (``num_classes`` = background), ``ltrb [B, A, 4]`` distances (pixels) and
    ``centerness [B, A]`` (``sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))``), for every point.
    """
    gt, gt_labels, valid = _pad_targets(boxes, labels, points.device)
    x, y = points[..., 0:1], points[..., 1:2]                        # [B, A, 1]
    l, t = x - gt[:, None, :, 0], y - gt[:, None, :, 1]              # [B, A, N]
    r, b = gt[:, None, :, 2] - x, gt[:, None, :, 3] - y
    ltrb = torch.stack([l, t, r, b], dim=-1)                         # [B, A, N, 4]
    inside = ltrb.amin(dim=-1) > 0
    cx, cy = (gt[..., 0] + gt[..., 2]) / 2, (gt[..., 1] + gt[..., 3]) / 2   # [B, N]
    radius = (center_radius * strides)[..., None]                     # [B, A, 1]
    near_centre = ((x - cx[:, None]).abs() < radius) & ((y - cy[:, None]).abs() < radius)
    # level ranges: (8 * previous stride, 8 * stride], the finest from 0 and the coarsest unbounded
    lo = torch.zeros_like(strides)
    hi = torch.full_like(strides, float("inf"))
    for k, s in enumerate(level_strides):
        at = strides == float(s)
        if k > 0:
            lo = torch.where(at, 8.0 * float(level_strides[k - 1]), lo)
        if k < len(level_strides) - 1:
            hi = torch.where(at, 8.0 * float(s), hi)
    reach = ltrb.amax(dim=-1)
    in_range = (reach > lo[..., None]) & (reach <= hi[..., None])
    candidate = inside & near_centre & in_range & valid[:, None, :]
    area = ((gt[..., 2] - gt[..., 0]) * (gt[..., 3] - gt[..., 1]))[:, None, :].expand_as(candidate)
    area = torch.where(candidate, area, torch.full_like(area, float("inf")))
    best_area, best = area.min(dim=-1)                              # [B, A]
    positive = torch.isfinite(best_area)
    target_labels = torch.gather(gt_labels, 1, best)
    target_labels = torch.where(positive, target_labels, torch.full_like(target_labels, num_classes))
    target_ltrb = torch.gather(ltrb, 2, best[..., None, None].expand(-1, -1, 1, 4)).squeeze(2)
    lr, tb = target_ltrb[..., 0::2], target_ltrb[..., 1::2]
    ratio = (lr.amin(-1) / lr.amax(-1).clamp_min(1e-6)) * (tb.amin(-1) / tb.amax(-1).clamp_min(1e-6))
    centerness = torch.where(positive, ratio.clamp_min(0).sqrt(), torch.zeros_like(ratio))
    return target_labels, target_ltrb, centerness


class FCOSLoss(nn.Module):
    """``forward(output [B, A, C + 8], boxes, labels) -> scalar``: the FCOS head's loss on a batch.

    ``boxes[i]`` ``[N_i, 4]`` xyxy pixels, ``labels[i]`` ``[N_i]`` in ``[0, C)`` (lists, best left on the
    CPU as the loader gives them: they are checked there and padded into one copy to the device). The
    sum of: the sigmoid focal loss (alpha 0.25, gamma 2) over every point and class, divided by the
    number of positive points; the GIoU loss of the positives' boxes, weighted by their centerness
    targets and divided by the sum of those; and the centerness BCE over the positives, divided by their
    number (FCOS with the authors' improvements: centre sampling, GIoU, centerness on the box branch).
    Every term is a masked sum over all points (no boolean indexing, so no host sync on a GPU). Under
    torch.distributed the normalisers are averaged across processes (one all-reduce of two numbers), so
    the loss of a global batch does not depend on how it is split.

    Args:
        num_classes: the head's classes.
        strides: the head's level strides, finest first (``FCOSHead.strides``).
    """

    def __init__(self, num_classes: int, strides: Sequence[float], focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, center_radius: float = 1.5):
        super().__init__()
        self.num_classes = int(num_classes)
        self.strides = [float(s) for s in strides]
        self.focal_alpha, self.focal_gamma, self.center_radius = focal_alpha, focal_gamma, center_radius

    def forward(self, output: Tensor, boxes: Sequence[Tensor], labels: Sequence[Tensor]) -> Tensor:
        logits, dist_pred, ctr_logit, points, strides = split_detection_output(output.float())
        points, strides = points.detach(), strides.detach()  # constants of the head's layout
        C = logits.shape[-1]
        if C != self.num_classes:
            raise ValueError(f"FCOSLoss: the head predicts {C} classes, the loss was built for "
                             f"{self.num_classes}")
        if len(boxes) != output.shape[0] or len(labels) != output.shape[0]:
            raise ValueError(f"FCOSLoss: {output.shape[0]} images but {len(boxes)} box and {len(labels)} "
                             f"label lists")
        for i, (b, lab) in enumerate(zip(boxes, labels)):
            if b.dim() != 2 or b.shape[-1] != 4 or lab.shape != b.shape[:1]:
                raise ValueError(f"FCOSLoss: image {i}: boxes must be [N, 4] and labels [N], got "
                                 f"{tuple(b.shape)} and {tuple(lab.shape)}")
        # the range check where the labels are on the host (the loader's): one pass over the batch's labels
        if labels and labels[0].device.type == "cpu":
            flat = torch.cat([lab.reshape(-1) for lab in labels])
            if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= C):
                i = next(k for k, lab in enumerate(labels)
                         if lab.numel() and (lab.min() < 0 or lab.max() >= C))
                raise ValueError(f"FCOSLoss: image {i}: labels must be in [0, {C}), got {labels[i].tolist()}")
        target_labels, target_ltrb, target_ctr = fcos_targets(points, strides, boxes, labels, C, self.strides,
                                                              self.center_radius)
        positive = (target_labels < C).float()
        onehot = F.one_hot(target_labels, C + 1)[..., :C].to(logits.dtype)
        norms = torch.stack([positive.sum(), (target_ctr * positive).sum()])
        norms = mean_over_processes(norms)
        num_pos, ctr_sum = norms[0].clamp_min(1.0), norms[1].clamp_min(1e-6)
        cls_loss = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma,
                                      reduction="sum") / num_pos
        # background points get a unit box as target: finite GIoU, weighted by their zero centerness
        target_ltrb = torch.where(positive[..., None] > 0, target_ltrb, torch.ones_like(target_ltrb))
        pred_boxes = torch.cat([points - dist_pred[..., :2], points + dist_pred[..., 2:]], dim=-1)
        target_boxes = torch.cat([points - target_ltrb[..., :2], points + target_ltrb[..., 2:]], dim=-1)
        giou = generalized_box_iou_loss(pred_boxes.reshape(-1, 4), target_boxes.reshape(-1, 4),
                                        reduction="none")
        box_loss = (giou * target_ctr.reshape(-1)).sum() / ctr_sum
        ctr_loss = F.binary_cross_entropy_with_logits(ctr_logit, target_ctr, weight=positive,
                                                      reduction="sum") / num_pos
        return cls_loss + box_loss + ctr_loss
