"""Pure-PyTorch twins of the custom ops: the ground truth the kernels are tested against, and the
eager baselines the benchmark measures. Same signatures as mtvision.ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def fused_dense_loss(seg_logits: Tensor | None, seg_target: Tensor | None,
                     depth_pred: Tensor | None, depth_target: Tensor | None,
                     normal_pred: Tensor | None, normal_target: Tensor | None,
                     ignore_index: int = 255) -> Tensor:
    """The three losses as separate eager passes, as MTAN/LibMTL/Nash-MTL compute them (with the
    empty-mask case made 0 instead of NaN). Returns float32 [3] (float64 for float64 inputs)."""
    preds = [p for p in (seg_logits, depth_pred, normal_pred) if p is not None]
    out_dtype = torch.float64 if any(p.dtype == torch.float64 for p in preds) else torch.float32
    zero = preds[0].new_zeros((), dtype=out_dtype)
    losses = [zero, zero, zero]
    if seg_logits is not None:
        valid = seg_target != ignore_index
        ce = F.cross_entropy(seg_logits.to(out_dtype), seg_target, ignore_index=ignore_index,
                             reduction="sum")
        losses[0] = ce / valid.sum().clamp_min(1)
    if depth_pred is not None:
        valid = depth_target > 0
        err = (depth_pred.to(out_dtype) - depth_target.to(out_dtype)).abs()
        losses[1] = (err * valid).sum() / valid.sum().clamp_min(1)
    if normal_pred is not None:
        target = normal_target.to(out_dtype)
        valid = (target * target).sum(1) > 0
        cos = (F.normalize(normal_pred.to(out_dtype), dim=1, eps=1e-12) * target).sum(1)
        losses[2] = ((1 - cos) * valid).sum() / valid.sum().clamp_min(1)
    return torch.stack(losses)


def _as_chunks(grads):
    return [grads] if isinstance(grads, Tensor) else list(grads)


def gram_matrix(grads: Tensor | list[Tensor]) -> Tensor:
    """Gramian ``G[s,t] = <g_s, g_t>`` of T per-task gradients, ``[T,T]``: ``grads`` is ``[T,P]`` or
    a list of ``[T,...]`` chunks (one per parameter) whose flattened concatenation is ``[T,P]``.
    Accumulated in float64 here (the reference); float32 for float32 inputs in the op."""
    chunks = _as_chunks(grads)
    if not chunks:
        raise ValueError("gram_matrix: no gradients given")
    T = chunks[0].shape[0]
    gram = torch.zeros(T, T, dtype=torch.float64, device=chunks[0].device)
    for c in chunks:
        flat = c.reshape(T, -1).double()
        gram += flat @ flat.T
    return gram


def weighted_sum(grads: Tensor | list[Tensor], weights: Tensor) -> Tensor | list[Tensor]:
    """``sum_t weights[t] * grads[t]``: ``[P]`` for ``[T,P]`` grads, or a list of ``[...]`` chunks for a
    list of ``[T,...]`` chunks, each in its chunk's dtype."""
    w = weights.double()
    out = [torch.tensordot(w.to(c.device), c.double(), dims=1).to(c.dtype) for c in _as_chunks(grads)]
    return out[0] if isinstance(grads, Tensor) else out


def counter_uniform(seed: int, n: int, first: int = 0) -> Tensor:
    """The draws of ``mtvision.ops.sign_dropout_sum``, ``[n]`` float32 for coordinates ``first ..
    first + n - 1``: ``mix32(mix32(i ^ lo) + hi)`` with ``lo``/``hi`` the seed's 32-bit halves and mix32
    MurmurHash3's finaliser (mod 2^32), the top 24 bits / 2^24."""
    import numpy as np

    def mix32(h):
        h = h ^ (h >> np.uint32(16))
        h = h * np.uint32(0x85EBCA6B)
        h = h ^ (h >> np.uint32(13))
        h = h * np.uint32(0xC2B2AE35)
        return h ^ (h >> np.uint32(16))

    seed %= 2**64
    lo, hi = np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32)
    with np.errstate(over="ignore"):
        h = mix32(mix32(np.arange(first, first + n, dtype=np.uint64).astype(np.uint32) ^ lo) + hi)
    return torch.from_numpy((h >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24))


def sign_dropout_sum(grads: Tensor | list[Tensor], seed: int, leak: float = 0.0) -> Tensor | list[Tensor]:
    """GradDrop's combination (Chen et al. 2020) of ``[T, ...]`` chunks, written per task: the sign
    purity ``P = ½(1 + Σ_t g_t / Σ_t |g_t|)`` (½ where all are 0), the mask ``M_t = [P > u][g_t > 0] +
    [P < u][g_t < 0]`` with ``u`` from :func:`counter_uniform` over the chunks' coordinates in order, and
    ``Σ_t g_t (leak + (1 − leak) M_t)``, in float64; each result in its chunk's dtype."""
    chunks = _as_chunks(grads)
    out, first = [], 0
    for c in chunks:
        g = c.double()
        mass = g.abs().sum(0)
        purity = torch.where(mass > 0, 0.5 * (1 + g.sum(0) / torch.where(mass > 0, mass, 1.0)), 0.5)
        u = counter_uniform(seed, purity.numel(), first).double().reshape(purity.shape).to(g.device)
        first += purity.numel()
        mask = ((purity > u) & (g > 0)) | ((purity < u) & (g < 0))
        out.append((g * (leak + (1 - leak) * mask.double())).sum(0).to(c.dtype))
    return out[0] if isinstance(grads, Tensor) else out


def excess_risk_step(grads: Tensor | list[Tensor], accumulator: Tensor | list[Tensor],
                     eps: float = 1e-7) -> Tensor:
    """ExcessMTL's AdaGrad step (He et al. 2024) on ``[T, ...]`` chunks, written out: ``A += g²`` (stored
    in A's dtype), and per task ``Σ g² / sqrt(A + eps)`` with the stored A, in float64: ``[T]``."""
    chunks = _as_chunks(grads)
    accs = [accumulator] if isinstance(accumulator, Tensor) else list(accumulator)
    T = chunks[0].shape[0]
    total = torch.zeros(T, dtype=torch.float64, device=chunks[0].device)
    for g, a in zip(chunks, accs):
        sq = g.double() ** 2
        a.copy_((a.double() + sq.view(a.shape)).to(a.dtype))
        total += (sq / torch.sqrt(a.double().view(sq.shape) + eps)).reshape(T, -1).sum(1)
    return total
