"""An mtvision plugin: a new task (semantic boundaries) with its own head, loss and metric, and a new
loss-weighting method. Nothing in mtvision is edited: a config lists this module in ``custom_imports``
and ``tools/train.py`` imports it before anything is built (its folder must be on ``PYTHONPATH``)."""

import torch
import torch.nn.functional as F
from torch import nn

from mtvision.balancing import LossWeighting
from mtvision.distributed import all_reduce_sum
from mtvision.registry import BALANCERS, HEADS, TASKS
from mtvision.tasks import Task


def boundaries(seg: torch.Tensor, ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """Class boundaries of label maps ``[B,H,W]``: ``(edge [B,1,H,W] in {0,1}, valid [B,1,H,W])``; a pixel
    is an edge where its right or lower neighbour has another class, invalid next to ignored pixels."""
    seg = seg.long()
    edge = torch.zeros_like(seg, dtype=torch.bool)
    valid = seg != ignore_index
    right = (seg[:, :, 1:] != seg[:, :, :-1])
    down = (seg[:, 1:, :] != seg[:, :-1, :])
    edge[:, :, :-1] |= right
    edge[:, :-1, :] |= down
    ignored_near = torch.zeros_like(valid)
    ignored_near[:, :, :-1] |= ~valid[:, :, 1:]
    ignored_near[:, :-1, :] |= ~valid[:, 1:, :]
    valid = valid & ~ignored_near
    return edge.unsqueeze(1).float(), valid.unsqueeze(1)


class BoundaryF1:
    """Boundary precision / recall / F1 (percent) at logit 0, pooled over every valid pixel of the set and
    summed across processes, with mtvision's metric interface (``update``, ``compute``, ``reset``)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.counts = torch.zeros(3, dtype=torch.float64)  # true positives, predicted edges, true edges

    def update(self, logits, target_edge, valid):
        pred = (logits > 0) & valid
        truth = (target_edge > 0.5) & valid
        self.counts += torch.stack([(pred & truth).sum(), pred.sum(), truth.sum()]).double().cpu()

    def compute(self):
        tp, predicted, actual = all_reduce_sum([self.counts])[0].tolist()
        precision = 100.0 * tp / max(predicted, 1.0)
        recall = 100.0 * tp / max(actual, 1.0)
        f1 = 2 * precision * recall / max(precision + recall, 1e-12)
        return {"F1": f1, "precision": precision, "recall": recall}


@TASKS.register("edges")
class BoundaryTask(Task):
    """Semantic boundaries, learnt from the segmentation labels every dataset here gives."""

    target_keys = ("seg",)
    higher_is_better = {"F1": True, "precision": True, "recall": True}
    primary_metric = "F1"
    delta_metrics = ("F1",)

    def build_loss(self):
        def loss(logits, batch):
            edge, valid = boundaries(batch["seg"], self.ignore_index)
            per_pixel = F.binary_cross_entropy_with_logits(logits.float(), edge, reduction="none")
            return (per_pixel * valid).sum() / valid.sum().clamp_min(1)
        return loss

    def build_metric(self):
        return BoundaryF1()

    def update_metric(self, metric, prediction, batch, device):
        edge, valid = boundaries(batch["seg"].to(device), self.ignore_index)
        metric.update(prediction.float(), edge, valid)


@HEADS.register("edge_head")
class EdgeHead(nn.Module):
    """Boundary logits ``[B,1,H,W]`` from the finest feature level, upsampled to the image size."""

    output_description = "boundary logits [B, 1, H, W] (edge where > 0)"

    def __init__(self, in_channels, strides, channels: int = 32):
        super().__init__()
        first = in_channels[0] if isinstance(in_channels, (list, tuple)) else in_channels
        self.conv = nn.Sequential(nn.Conv2d(first, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, 1, 1))

    def forward(self, features, image_size):
        return F.interpolate(self.conv(features[0]), size=tuple(image_size), mode="bilinear",
                             align_corners=False)


@BALANCERS.register("initial_loss")
class InitialLossWeighting(LossWeighting):
    """``w_t = scale / L_t(first step)``: each task's loss measured in units of its starting value."""

    def __init__(self, num_tasks: int, scale: float = 1.0):
        super().__init__(num_tasks)
        self.scale = float(scale)
        self.register_buffer("initial", torch.zeros(num_tasks))
        self.started = False

    def weights(self, task_losses):
        if not self.started:
            self.initial.copy_(task_losses.detach().clamp_min(1e-8))
            self.started = True
        return self.scale / self.initial

    # saved and restored with the buffer, so a resumed run keeps its first losses
    def get_extra_state(self):
        return {"started": self.started}

    def set_extra_state(self, state):
        self.started = bool(state["started"])
