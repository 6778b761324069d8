"""Python face of the fused dense multi-task loss op: argument handling, fake kernels, autograd."""

from __future__ import annotations

import torch
from torch import Tensor

_OPS = torch.ops.mtvision


def fused_dense_loss(
    seg_logits: Tensor | None,
    seg_target: Tensor | None,
    depth_pred: Tensor | None,
    depth_target: Tensor | None,
    normal_pred: Tensor | None,
    normal_target: Tensor | None,
    ignore_index: int = 255,
) -> Tensor:
    """Per-task mean losses ``[ce, depth_l1, normal_cos]`` in one pass: float32 ``[3]`` for float32,
    float16 and bfloat16 predictions (accumulated in float32 or wider), float64 for float64 ones.

    - ``seg_logits [B,C,H,W]``, ``seg_target [B,H,W]`` int64: cross-entropy over pixels whose label
      is not ``ignore_index``.
    - ``depth_pred, depth_target [B,1,H,W]`` (metres): L1 over pixels with ``depth_target > 0``.
    - ``normal_pred [B,3,H,W]`` raw (normalised inside, eps 1e-12), ``normal_target [B,3,H,W]`` unit
      vectors: ``1 - cos`` over pixels whose target has non-zero norm.

    Any task's pair may be ``None``: its entry is 0. A task with no valid pixel gives 0 and a zero
    gradient. Differentiable w.r.t. every prediction: the backward is a second pass over the saved
    predictions and targets, reusing the forward's valid-pixel counts and, for segmentation, its
    per-pixel log-sum-exp (the softmax needs no second reduction over the classes); each task's
    per-pixel derivative is scaled by its loss's incoming gradient over its count. Every given task's
    gradient is computed, also when its loss gets a zero gradient (back-propagating one task alone).
    """
    pairs = {"seg": (seg_logits, seg_target), "depth": (depth_pred, depth_target),
             "normal": (normal_pred, normal_target)}
    for name, (pred, target) in pairs.items():
        if (pred is None) != (target is None):
            raise ValueError(f"fused_dense_loss: {name} prediction and target must be given together")
    preds = [p for p, _ in pairs.values() if p is not None]
    if not preds:
        raise ValueError("fused_dense_loss: at least one task must be given")
    # One dtype for all predictions (autocast may leave heads in different precisions).
    dtype = preds[0].dtype
    for p in preds[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    if preds[0].device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        # The CPU kernels take float32/float64 (CPU autocast gives bfloat16 maps); they accumulate
        # in float32 anyway, so the upcast changes no result.
        dtype = torch.float32
    cast = [None if p is None else p.to(dtype) for p in (seg_logits, depth_pred, normal_pred)]
    seg_logits, depth_pred, normal_pred = cast
    if depth_target is not None:
        depth_target = depth_target.to(dtype)
    if normal_target is not None:
        normal_target = normal_target.to(dtype)
    if seg_target is not None and seg_target.dtype != torch.int64:
        if seg_target.is_floating_point():
            raise TypeError(f"fused_dense_loss: seg_target must be an integer tensor, got {seg_target.dtype}")
        seg_target = seg_target.long()
    losses, _, _ = _OPS.fused_dense_loss_forward(
        seg_logits, seg_target, depth_pred, depth_target, normal_pred, normal_target, ignore_index)
    return losses


@torch.library.register_fake("mtvision::fused_dense_loss_forward")
def _forward_fake(seg_logits, seg_target, depth_pred, depth_target, normal_pred, normal_target,
                  ignore_index):
    preds = [p for p in (seg_logits, depth_pred, normal_pred) if p is not None]
    torch._check(len(preds) > 0, lambda: "fused_dense_loss: at least one task must be given")
    like = preds[0]
    acc = torch.float64 if like.dtype == torch.float64 else torch.float32
    if seg_logits is not None:
        lse = seg_logits.new_empty((seg_logits.shape[0], seg_logits.shape[2], seg_logits.shape[3]),
                                   dtype=acc)
    else:
        lse = like.new_empty(0, dtype=torch.float32)
    return like.new_empty(3, dtype=acc), like.new_empty(3, dtype=torch.int64), lse


@torch.library.register_fake("mtvision::fused_dense_loss_backward")
def _backward_fake(grad_losses, counts, seg_lse, seg_logits, seg_target, depth_pred, depth_target,
                   normal_pred, normal_target, ignore_index):
    like = next(p for p in (seg_logits, depth_pred, normal_pred) if p is not None)
    return tuple(torch.empty_like(p) if p is not None else like.new_empty(0)
                 for p in (seg_logits, depth_pred, normal_pred))


def _setup_context(ctx, inputs, output):
    *tensors, ignore_index = inputs
    _, counts, seg_lse = output
    ctx.ignore_index = ignore_index
    ctx.present = [t is not None for t in tensors]
    ctx.save_for_backward(counts, seg_lse, *[t for t in tensors if t is not None])
    ctx.mark_non_differentiable(counts, seg_lse)


def _backward(ctx, grad_losses, _grad_counts, _grad_lse):
    counts, seg_lse, *saved = ctx.saved_tensors
    it = iter(saved)
    tensors = [next(it) if present else None for present in ctx.present]
    grads = _OPS.fused_dense_loss_backward(grad_losses, counts, seg_lse, *tensors, ctx.ignore_index)
    # inputs: seg_logits, seg_target, depth_pred, depth_target, normal_pred, normal_target, ignore_index
    return (grads[0] if ctx.present[0] else None, None, grads[1] if ctx.present[2] else None, None,
            grads[2] if ctx.present[4] else None, None, None)


torch.library.register_autograd("mtvision::fused_dense_loss_forward", _backward,
                                setup_context=_setup_context)
