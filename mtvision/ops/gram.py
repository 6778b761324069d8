"""Python face of the Gramian ops: list/tensor handling, fake kernels, autograd."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_OPS = torch.ops.mtvision


def gram_matrix(grads: Tensor | Sequence[Tensor]) -> Tensor:
    """Gramian ``G[s,t] = <g_s, g_t>`` of T per-task gradients, ``[T,T]``.

    ``grads`` is ``[T,P]`` or a list of ``[T,...]`` chunks (one per parameter), read in place with no
    concatenation. Float32 accumulation in float64 per work item (float64 result for float64 input);
    float16/bfloat16 gradients are read as they are and accumulated in float32.
    """
    return _OPS.gram_matrix(_chunk_list(grads, "gram_matrix"))


def weighted_sum(grads: Tensor | Sequence[Tensor], weights: Tensor,
                 out: Tensor | Sequence[Tensor] | None = None) -> Tensor | list[Tensor]:
    """``sum_t weights[t] * grads[t]``: ``[P]`` for ``[T,P]`` gradients, or one ``[...]`` tensor per
    ``[T,...]`` chunk, each in its chunk's dtype (accumulated in float32 or wider).

    ``out``: write into these tensors instead (same structure as the result, contiguous), e.g. the
    parameters' persistent ``.grad`` buffers; not differentiable.
    """
    chunks = _chunk_list(grads, "weighted_sum")
    if out is None:
        result = _OPS.weighted_sum(chunks, weights)
        return result[0] if isinstance(grads, Tensor) else result
    outs = [out] if isinstance(out, Tensor) else list(out)
    _OPS.weighted_sum_out(chunks, weights, outs)
    return out if isinstance(out, Tensor) else outs


def sign_dropout_sum(grads: Tensor | Sequence[Tensor], seed: int, leak: float = 0.0,
                     out: Tensor | Sequence[Tensor] | None = None) -> Tensor | list[Tensor]:
    """GradDrop's combination of ``[T, ...]`` per-task gradient chunks, one ``[...]`` result per chunk.

    Per coordinate, with ``pos``/``neg`` the sums of the positive/negative task values and the sign
    purity ``P = ½(1 + (pos + neg)/(pos − neg))`` (½ where every value is 0): ``leak·(pos + neg) +
    (1 − leak)·([P > u]·pos + [P < u]·neg)``, i.e. each task's value is kept when its sign won the draw.
    ``u`` is a counter-based uniform draw of ``seed`` (a 64-bit integer) and the coordinate's index over
    all chunks in order (``reference.counter_uniform``): the same on every device, and no tensor of
    draws. Accumulated in float32 (float64 for float64 gradients); not differentiable. ``out``: write
    into these tensors instead (contiguous, the chunks' shapes without T).
    """
    chunks = _chunk_list(grads, "sign_dropout_sum")
    outs = ([out] if isinstance(out, Tensor) else list(out)) if out is not None else [
        c.new_empty(c.shape[1:]) for c in chunks]
    _OPS.sign_dropout_sum_out(chunks, int(seed), float(leak), outs)
    if out is not None:
        return out
    return outs[0] if isinstance(grads, Tensor) else outs


def excess_risk_step(grads: Tensor | Sequence[Tensor], accumulator: Tensor | Sequence[Tensor],
                     eps: float = 1e-7) -> Tensor:
    """ExcessMTL's AdaGrad step over ``[T, ...]`` per-task gradient chunks, in one pass: ``accumulator +=
    grads²`` in place (one tensor per chunk, its shape and dtype, contiguous), and returns the ``[T]``
    float64 sums over all chunks of ``grads² / sqrt(accumulator + eps)`` (the updated accumulator).
    Accumulated in float32 per work item (float64 for float64 gradients), the items summed in float64 in
    a fixed order; not differentiable."""
    chunks = _chunk_list(grads, "excess_risk_step")
    accs = [accumulator] if isinstance(accumulator, Tensor) else list(accumulator)
    return _OPS.excess_risk_step(chunks, accs, float(eps))


def _chunk_list(grads, op: str) -> list[Tensor]:
    chunks = [grads] if isinstance(grads, Tensor) else list(grads)
    if not chunks:
        raise ValueError(f"{op}: no gradients given")
    return chunks


@torch.library.register_fake("mtvision::gram_matrix")
def _gram_fake(grads):
    torch._check(len(grads) > 0, lambda: "gram_matrix: no gradients given")
    T = grads[0].shape[0]
    dtype = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
    return grads[0].new_empty((T, T), dtype=dtype)


@torch.library.register_fake("mtvision::weighted_sum")
def _weighted_sum_fake(grads, weights):
    return [g.new_empty(g.shape[1:]) for g in grads]


@torch.library.register_fake("mtvision::weighted_sum_out")
def _weighted_sum_out_fake(grads, weights, out):
    return None


@torch.library.register_fake("mtvision::sign_dropout_sum_out")
def _sign_dropout_sum_out_fake(grads, seed, leak, out):
    return None


@torch.library.register_fake("mtvision::excess_risk_step")
def _excess_risk_step_fake(grads, accumulator, eps):
    torch._check(len(grads) > 0, lambda: "excess_risk_step: no gradients given")
    return grads[0].new_empty((grads[0].shape[0],), dtype=torch.float64)


def _gram_setup(ctx, inputs, output):
    (grads,) = inputs
    ctx.save_for_backward(*grads)


def _gram_backward(ctx, grad_gram):
    # dG/dg: d<g_s, g_t> contributes grad_gram[s,t] * g_t to g_s and grad_gram[s,t] * g_s to g_t.
    sym = grad_gram + grad_gram.T
    return [(sym.to(g.dtype) @ g.reshape(g.shape[0], -1)).reshape(g.shape) for g in ctx.saved_tensors]


def _weighted_sum_setup(ctx, inputs, output):
    grads, weights = inputs
    ctx.save_for_backward(weights, *grads)


def _weighted_sum_backward(ctx, grad_outs):
    weights, *grads = ctx.saved_tensors
    grad_grads = [None if go is None else
                  (weights.to(g.dtype).reshape(-1, *([1] * (g.dim() - 1))) * go.unsqueeze(0))
                  for g, go in zip(grads, grad_outs)]
    grad_weights = None
    if ctx.needs_input_grad[1]:
        grad_weights = sum(g.reshape(g.shape[0], -1).to(weights.dtype) @ go.reshape(-1).to(weights.dtype)
                           for g, go in zip(grads, grad_outs) if go is not None)
    return grad_grads, grad_weights


torch.library.register_autograd("mtvision::gram_matrix", _gram_backward, setup_context=_gram_setup)
torch.library.register_autograd("mtvision::weighted_sum", _weighted_sum_backward,
                                setup_context=_weighted_sum_setup)
