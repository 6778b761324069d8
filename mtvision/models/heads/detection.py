"""Object detection head: FCOS (Tian et al. 2019, "FCOS: Fully Convolutional One-Stage Object Detection"),
anchor-free, on the neck's levels, and the decoding of its output into boxes.

Per level, two towers of ``num_convs`` conv3x3-GroupNorm-ReLU blocks (shared across levels) feed a
classification conv (``num_classes`` sigmoid logits), a box conv (distances to the box's left, top,
right and bottom edges) and a centerness conv (on the box tower, as in the authors' later "FCOS
improvements" that torchvision and mmdetection use). Distances are ``relu(scale_l * x) * stride_l``
with a learned scale per level (the improvements' normalised regression targets).

The head returns one tensor per image batch, ``[B, A, num_classes + 8]`` over the ``A`` points of all
levels (finest level first, row-major): ``num_classes`` class logits, the 4 distances (pixels), the
centerness logit, then the point's ``x, y`` (pixels, the cell's centre) and its level's stride. The
last three columns are constants: with them the output is self-describing, so the loss
(:class:`mtvision.losses.FCOSLoss`), :func:`decode_detections` and an exported ONNX graph need nothing
else, and the per-task gradient methods see one output tensor per task as for the dense heads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from ...registry import HEADS
from .common import ConvGNReLU, _check_levels

__all__ = ["FCOSHead", "DETECTION_EXTRA_COLUMNS", "decode_detections", "detection_scores_and_boxes",
           "split_detection_output"]

#: Columns after the class logits: 4 distances, centerness, point x, point y, stride.
DETECTION_EXTRA_COLUMNS = 8


def split_detection_output(output: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``[B, A, C + 8]`` -> ``(class logits [B,A,C], ltrb distances [B,A,4], centerness logit [B,A],
    points xy [B,A,2], strides [B,A])``."""
    c = output.shape[-1] - DETECTION_EXTRA_COLUMNS
    if c < 1:
        raise ValueError(f"detection output must have num_classes + {DETECTION_EXTRA_COLUMNS} columns, "
                         f"got shape {tuple(output.shape)}")
    return (output[..., :c], output[..., c:c + 4], output[..., c + 4], output[..., c + 5:c + 7],
            output[..., c + 7])


class _Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


@HEADS.register("fcos")
class FCOSHead(nn.Module):
    """FCOS on the neck's levels: ``forward(features, image_size) -> [B, A, num_classes + 8]`` (see the
    module docstring for the columns).

    Args:
        in_channels: channels of each level (all equal, e.g. the FPN width).
        strides: stride of each level, finest first.
        num_classes: object classes (sigmoid per class; no background class).
        channels: tower width.
        num_convs: conv blocks per tower.
        min_stride: levels finer than this are not used (FCOS starts at stride 8).
        extra_levels: coarser levels made by the head from the coarsest one, each a 3x3 conv of stride 2
            (the first on that level, the next on the ReLU of the previous; torchvision's and FCOS's
            P6/P7): 2 gives FCOS's P3-P7 on an FPN with levels up to stride 32. They are the head's own
            parameters, since the dense heads have no use for them.
        prior_prob: initial foreground probability of the class logits (focal-loss initialisation).
        score_threshold, nms_threshold, max_detections: :meth:`predict`'s decoding.
    """

    #: What the output is, for an exported model's metadata (``mtvision.export``).
    output_description = (
        "FCOS predictions before NMS [B, A, num_classes + 8] at every point of the head's levels: class "
        "logits, distances to the box's left, top, right, bottom edges (pixels), centerness logit, point x, "
        "y (pixels), stride; score = sqrt(sigmoid(class) * sigmoid(centerness)), box = point -/+ distances, "
        "then NMS (mtvision.models.heads.decode_detections)")

    def __init__(self, in_channels: Union[int, Sequence[int]], strides: Sequence[int], num_classes: int,
                 channels: int = 128, num_convs: int = 4, min_stride: int = 8, extra_levels: int = 0,
                 prior_prob: float = 0.01,
                 score_threshold: float = 0.05, nms_threshold: float = 0.6, max_detections: int = 100):
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob!r}")
        if num_convs < 0:
            raise ValueError(f"num_convs must be >= 0, got {num_convs!r}")
        if not isinstance(extra_levels, int) or isinstance(extra_levels, bool) or extra_levels < 0:
            raise ValueError(f"extra_levels must be an int >= 0, got {extra_levels!r}")
        in_channels, strides = _check_levels(in_channels, strides)
        self.levels = [i for i, s in enumerate(strides) if s >= min_stride]
        if not self.levels:
            raise ValueError(f"min_stride {min_stride}: no level has a stride that large (strides {strides})")
        used = [in_channels[i] for i in self.levels]
        if len(set(used)) != 1:
            raise ValueError(f"in_channels must be equal on the levels used (shared towers), got {used}")
        c_in = used[0]
        self.strides = [strides[i] for i in self.levels]
        self.extra = nn.ModuleList(nn.Conv2d(c_in, c_in, 3, stride=2, padding=1) for _ in range(extra_levels))
        for conv in self.extra:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)
        self.strides += [self.strides[-1] * 2 ** (k + 1) for k in range(extra_levels)]
        self.num_classes = num_classes
        self.score_threshold, self.nms_threshold = score_threshold, nms_threshold
        self.max_detections = max_detections

        def tower() -> nn.Sequential:
            return nn.Sequential(*[ConvGNReLU(c_in if k == 0 else channels, channels)
                                   for k in range(num_convs)])

        self.cls_tower, self.box_tower = tower(), tower()
        width = channels if num_convs else c_in
        self.cls_logits = nn.Conv2d(width, num_classes, 3, padding=1)
        self.box_pred = nn.Conv2d(width, 4, 3, padding=1)
        self.centerness = nn.Conv2d(width, 1, 3, padding=1)
        self.scales = nn.ModuleList(_Scale() for _ in self.strides)
        for conv in (self.cls_logits, self.box_pred, self.centerness):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1.0 - prior_prob) / prior_prob))

    def forward(self, features: Sequence[Tensor], image_size: Sequence[int]) -> Tensor:
        levels = [features[i] for i in self.levels]
        for k, conv in enumerate(self.extra):
            levels.append(conv(levels[-1] if k == 0 else F.relu(levels[-1])))
        outs = []
        for level, (x, stride) in enumerate(zip(levels, self.strides)):
            b, _, h, w = x.shape
            cls_feat, box_feat = self.cls_tower(x), self.box_tower(x)
            # float32 whatever the autocast: pixel coordinates in bfloat16 would be off by up to 8 pixels
            logits = self.cls_logits(cls_feat).float()
            dist = F.relu(self.scales[level](self.box_pred(box_feat).float())) * stride
            ctr = self.centerness(box_feat).float()
            ys = (torch.arange(h, device=x.device, dtype=torch.float32) + 0.5) * stride
            xs = (torch.arange(w, device=x.device, dtype=torch.float32) + 0.5) * stride
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            consts = torch.stack([grid_x, grid_y, torch.full_like(grid_x, stride)]).expand(b, 3, h, w)
            level_out = torch.cat([logits, dist, ctr, consts], dim=1)
            outs.append(level_out.flatten(2).transpose(1, 2))
        return torch.cat(outs, dim=1)

    def predict(self, output: Tensor, image_size: Sequence[int]) -> list[dict[str, Tensor]]:
        """:func:`decode_detections` with this head's thresholds."""
        return decode_detections(output, image_size, self.score_threshold, self.nms_threshold,
                                 self.max_detections)


def detection_scores_and_boxes(output: Tensor, image_size: Optional[Sequence[int]] = None
                               ) -> tuple[Tensor, Tensor]:
    """FCOS output ``[B, A, C + 8]`` -> ``(scores [B, A, C], boxes [B, A, 4])``: the ranking score
    ``sqrt(sigmoid(class logit) * sigmoid(centerness))`` of every (point, class) and every point's box
    (xyxy pixels: the point -/+ its distances), clipped to ``image_size = (H, W)`` when given. Float32."""
    logits, dist, ctr, points, _ = split_detection_output(output.float())
    scores = torch.sqrt(torch.sigmoid(logits) * torch.sigmoid(ctr).unsqueeze(-1))
    boxes = torch.cat([points - dist[..., :2], points + dist[..., 2:]], dim=-1)
    if image_size is not None:
        h, w = image_size[0], image_size[1]
        boxes = torch.stack([boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h),
                             boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, h)], dim=-1)
    return scores, boxes


def decode_detections(output: Tensor, image_size: Optional[Sequence[int]] = None,
                      score_threshold: float = 0.05, nms_threshold: float = 0.6, max_detections: int = 100,
                      pre_nms_top_k: int = 1000) -> list[dict[str, Tensor]]:
    """FCOS output ``[B, A, C + 8]`` -> per image ``{"boxes" [K,4] xyxy pixels, "scores" [K], "labels" [K]}``.

    Score = ``sqrt(sigmoid(class logit) * sigmoid(centerness))`` (FCOS's ranking score); the
    ``pre_nms_top_k`` best (point, class) pairs above ``score_threshold`` are kept, their boxes clipped
    to ``image_size = (H, W)`` when given, then class-wise NMS at ``nms_threshold`` IoU and the
    ``max_detections`` best by score. (:func:`mtvision.inference.decode_detections_fixed` is the same
    decoding with fixed-size outputs, as an exported graph computes it.)"""
    if image_size is not None:
        image_size = (float(image_size[0]), float(image_size[1]))
    scores_all, boxes_all = detection_scores_and_boxes(output, image_size)
    C = scores_all.shape[-1]
    results = []
    for b in range(output.shape[0]):
        scores = scores_all[b].flatten()
        keep = torch.nonzero(scores > score_threshold).squeeze(1)
        if keep.numel() > pre_nms_top_k:
            keep = keep[scores[keep].topk(pre_nms_top_k).indices]
        point_idx, labels = keep // C, keep % C
        boxes = boxes_all[b, point_idx]
        s = scores[keep]
        kept = batched_nms(boxes, s, labels, nms_threshold)[:max_detections]
        results.append({"boxes": boxes[kept], "scores": s[kept], "labels": labels[kept]})
    return results
