"""Backward passes of the gradient-balancing methods: per-task gradients -> Gramian -> T weights ->
one combined gradient, without flattening and without a host sync per task pair.

- Parameter level (``param``): one forward, then T backward passes (``autograd.grad`` with the graph
  retained); task t's gradient w.r.t. every shared parameter is copied into row t of a buffer
  ``[T, *p.shape]`` allocated once, the Gramian is read from those buffers in place
  (``mtvision.ops.gram_matrix``), and ``mtvision.ops.weighted_sum`` writes ``p.grad``.
- Representation level (``rep``, e.g. MGDA-UB): the per-task gradients are taken w.r.t. the shared
  features (the neck's levels), which only costs T backward passes through the heads; their weighted
  combination is then back-propagated through the backbone once.

Under torch.distributed (DDP launched by torchrun), the per-task gradients of the local batch are
averaged across processes before the Gramian, so every process computes the same weights and the same
update as one process on the global batch: at the parameter level the T x P buffers and the heads'
gradients live in one flat tensor, reduced by one all-reduce (not T); at the representation level the
T x T Gramian is summed across processes (one small all-reduce) and the parameter gradients are
averaged with one more. Run the forward and this backward under DDP's ``no_sync()`` so that DDP's own
reducer stays out of it.

The device is waited for once in this backward: the Gramian comes to the host (with any small tensor the
caller passes, e.g. its logged losses), the T x T problem is solved there and T weights go back.
Gradient clipping at the parameter level is folded into those weights (``max_norm``). The
buffers keep each parameter's memory layout, so ``.grad`` has the parameter's strides, as fused
optimizer updates require.

Task-specific parameters (a head) get the gradient of their own task's loss. With fp16 loss scaling
the per-task losses come in scaled; the Gramian is unscaled (divided by scale^2) before the weights
are computed, and the combined gradient stays scaled for ``GradScaler.step``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..balancing import GradientAggregator
from ..ops import gram_matrix, weighted_sum

__all__ = ["GradientBalancer"]


def _layout_views(flat: Tensor, like: Tensor, rows: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Two views of ``flat`` (``[rows,] *like.shape`` elements) laid out in memory as ``like`` is: the
    contiguous one, with ``like``'s dimensions in memory order (what the ops read and write), and the
    one with ``like``'s shape and strides (what autograd's gradients are copied into). A ``like``
    that is not a permutation of a contiguous tensor gets the plain contiguous layout."""
    order = sorted(range(like.dim()), key=lambda d: -like.stride(d))  # stable: size-1 dims keep their place
    if not like.permute(order).is_contiguous():
        order = list(range(like.dim()))
    lead = [] if rows is None else [rows]
    dense = flat.view((*lead, *(like.shape[d] for d in order)))  # tuples: a 0-dim parameter has no sizes
    inverse = sorted(range(like.dim()), key=lambda d: order[d])
    return dense, dense.permute((*range(len(lead)), *(len(lead) + i for i in inverse)))


class GradientBalancer:
    """Runs the backward of a gradient-aggregation method for a model with shared and per-task parameters.

    Args:
        aggregator: the method (``weights(gram, generator) -> [T]``).
        shared: the shared parameters (backbone + neck) that get the combined gradient.
        task_params: per task (in loss order), the parameters only that task's loss reaches.
        level: ``"param"`` or ``"rep"``.
        generator: random source of stochastic methods (PCGrad); a CPU generator (the weights are
            solved on the host).
        distributed: average across torch.distributed processes; ``None``: when a process group with
            more than one process is initialised.
    """

    def __init__(self, aggregator: GradientAggregator, shared: Sequence[Tensor],
                 task_params: Sequence[Sequence[Tensor]], level: str = "param",
                 generator: Optional[torch.Generator] = None, distributed: Optional[bool] = None):
        if level not in ("param", "rep"):
            raise ValueError(f"balancer.level: expected 'param' or 'rep', got {level!r}")
        self.aggregator = aggregator
        self.shared = [p for p in shared if p.requires_grad]
        self.task_params = [[p for p in ps if p.requires_grad] for ps in task_params]
        self._heads = [p for ps in self.task_params for p in ps]
        self.level = level
        self.generator = generator
        self.distributed = distributed
        self._flat: Optional[Tensor] = None  # per-task shared rows, then the heads' gradients
        self._buffers: Optional[list[Tensor]] = None
        self._rows: Optional[list[list[Tensor]]] = None  # [t][k]: row t of buffer k (views made once)
        self._head_grads: Optional[list[Tensor]] = None
        self._combined: Optional[list[Tensor]] = None  # the op's output: contiguous, dims in memory order
        self._combined_grads: Optional[list[Tensor]] = None  # the same storage as the parameters' .grad
        self.last_weights: Optional[Tensor] = None  # [T] on the device: what the gradients were combined with
        self.last_weights_host: Optional[Tensor] = None  # the method's [T], float64 on the host, unclipped
        self.last_gram: Optional[Tensor] = None
        self.last_gram_host: Optional[Tensor] = None  # float64, unscaled, summed across processes
        self.last_gram_finite: bool = True
        self.last_read: Optional[Tensor] = None  # ``read_with_gram`` of the last backward, on the host
        self.last_grad_norm: Optional[float] = None  # total norm before clipping (``max_norm`` given)

    def _world_size(self) -> int:
        if self.distributed is False or not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size()

    def _param_buffers(self, T: int) -> list[Tensor]:
        """Per shared parameter a [T, *p.shape] buffer, and per head parameter a gradient buffer, all
        views of one flat tensor (allocated once) so that one all-reduce covers them.

        Every row is laid out in memory as its parameter is (channels_last weights too), and the ops
        get the buffers as contiguous tensors with the dimensions in memory order: the combined
        gradient then has the parameter's strides, which fused optimizers need (they read a gradient
        as flat memory in the parameter's order)."""
        if self._buffers is None or self._buffers[0].shape[0] != T:
            heads = self._heads
            sizes = [T * p.numel() for p in self.shared] + [p.numel() for p in heads]
            ref = self.shared[0]
            self._flat = torch.empty(sum(sizes), dtype=ref.dtype, device=ref.device)
            views = list(torch.split(self._flat, sizes))
            dense_and_logical = [_layout_views(v, p, T) for v, p in zip(views, self.shared)]
            self._buffers = [dense for dense, _ in dense_and_logical]
            self._rows = [[logical[t] for _, logical in dense_and_logical] for t in range(T)]
            self._head_grads = [_layout_views(v, p)[1] for v, p in zip(views[len(self.shared):], heads)]
            combined = [_layout_views(p.new_empty(p.numel()), p) for p in self.shared]
            self._combined = [dense for dense, _ in combined]
            self._combined_grads = [logical for _, logical in combined]
        return self._buffers

    def _average_across_processes(self, tensor: Tensor) -> None:
        if self._world_size() > 1:
            dist.all_reduce(tensor)
            tensor.div_(self._world_size())

    def _per_task_grads(self, losses: Tensor, outputs: Sequence[Tensor], inputs: Sequence[Tensor],
                        rows: Sequence[Sequence[Tensor]]) -> None:
        """``rows[t][k]`` := d losses[t] / d inputs[k]; task parameters' .grad := their task's gradient.

        Task t's loss reaches only task t's output, so one backward of ``sum_t losses[t]`` to the outputs
        (the fused loss's single backward) gives every d L_t / d output_t; each task's backward then
        starts from its own output and never walks the other heads (backward from ``losses[t]`` would,
        carrying zeros)."""
        T = losses.shape[0]
        n = len(inputs)
        output_grads = torch.autograd.grad(losses.sum(), list(outputs), retain_graph=True)
        for t in range(T):
            params = self.task_params[t]
            grads = torch.autograd.grad(outputs[t], [*inputs, *params], grad_outputs=output_grads[t],
                                        retain_graph=t < T - 1, allow_unused=True)
            # one multi-tensor copy per task (a copy kernel per parameter would dominate on a GPU)
            input_grads = grads[:n]
            if all(g is not None for g in input_grads):
                torch._foreach_copy_(rows[t], list(input_grads))
            else:  # an input this task does not reach: its row is 0
                present = [(row, g) for row, g in zip(rows[t], input_grads) if g is not None]
                if present:
                    torch._foreach_copy_([r for r, _ in present], [g for _, g in present])
                for row, g in zip(rows[t], input_grads):
                    if g is None:
                        row.zero_()
            for p, g in zip(params, grads[n:]):
                if g is None:
                    g = torch.zeros_like(p)
                elif g.stride() != p.stride():  # fused optimizers read .grad as flat memory in p's order
                    g = torch.empty_like(p).copy_(g)
                p.grad = g

    def _solve_on_host(self, buffers: Sequence[Tensor], inv_scale: Optional[float],
                       sum_across_processes: bool = False, read_with_gram: Optional[Tensor] = None,
                       extra: Optional[Tensor] = None) -> Optional[float]:
        """The method's weights from the Gramian of ``buffers``, solved on the host
        (``self.last_weights_host``, float64). ``read_with_gram`` comes to the host in the same copy
        (``self.last_read``), and so does the scalar ``extra``, whose value is returned."""
        gram = gram_matrix(buffers)
        if sum_across_processes and self._world_size() > 1:
            # feature gradients of different samples are different coordinates: the global Gramian
            # is the sum of the local ones (scaled as the mean loss over the global batch)
            dist.all_reduce(gram)
            gram = gram / (self._world_size() ** 2)
        if inv_scale is not None:
            gram = gram * (inv_scale * inv_scale)
        self.last_gram = gram
        # The T x T problem is solved on the host: one copy of T^2 numbers each way per step, instead of
        # the hundreds of tiny kernel launches an iterative solver makes on a GPU (measured on an H100:
        # MGDA / CAGrad / UPGrad steps 1.5-2.4x the passes they need when solved on the device). The
        # caller's small tensors (the trainer's logged losses, the heads' gradient norm) come back in
        # the same copy, so the step's first wait for the device is also its only one.
        T = gram.shape[0]
        parts = [gram.detach().reshape(-1)] + [x.detach().reshape(-1) for x in (read_with_gram, extra)
                                                if x is not None]
        packed = torch.cat([x.to(torch.float64) for x in parts]).cpu()
        gram_host = packed[: T * T].view(T, T)
        self.last_read = None if read_with_gram is None else packed[T * T: T * T + read_with_gram.numel()]
        self.last_gram_host = gram_host
        self.last_gram_finite = bool(torch.isfinite(gram_host).all())
        if self.last_gram_finite:
            w = self.aggregator.weights(gram_host, self.generator)
        else:  # the caller skips this step; no solver sees a NaN
            w = torch.zeros(T, dtype=torch.float64)
        self.last_weights_host = w
        return None if extra is None else float(packed[-1])

    def _to_device(self, w_host: Tensor) -> Tensor:
        self.last_weights = w_host.to(self.last_gram.device, torch.float32, non_blocking=True)
        return self.last_weights

    def _clip_factor(self, head_grads: Sequence[Tensor], head_norm: float, max_norm: float) -> float:
        """``torch.nn.utils.clip_grad_norm_``'s factor for the combined shared gradient and the heads'
        gradients, with no pass over the shared gradient: its squared norm is ``w^T G w`` from the
        Gramian on the host. Scales the heads' gradients in place; the caller scales the weights."""
        w, gram = self.last_weights_host, self.last_gram_host
        total = math.sqrt(max(float(w @ gram @ w), 0.0) + head_norm * head_norm)
        self.last_grad_norm = total
        factor = min(1.0, max_norm / (total + 1e-6))
        if factor < 1.0 and head_grads:
            torch._foreach_mul_(list(head_grads), factor)
        return factor

    def backward(self, losses: Tensor, outputs: Sequence[Tensor], features: Optional[Sequence[Tensor]] = None,
                 head_inputs: Optional[Sequence[Tensor]] = None, inv_scale: Optional[float] = None,
                 read_with_gram: Optional[Tensor] = None, max_norm: Optional[float] = None) -> Tensor:
        """Sets ``.grad`` of every shared and task parameter; returns the weights ``[T]`` (on the device) the
        shared gradients were combined with: the method's, times the clip factor when ``max_norm`` clips.

        ``losses``: the per-task losses ``[T]`` (graph alive; scaled under fp16); ``outputs``: each
        task's prediction, in the same order (task t's loss depends on ``outputs[t]`` only). At the
        ``rep`` level also ``features`` (the backbone/neck outputs, graph alive) and ``head_inputs``
        (the detached leaves the heads were run on). ``read_with_gram``: a small tensor brought to the
        host together with the Gramian (``self.last_read``, float64).

        ``max_norm`` (parameter level, unscaled losses): clip the gradients this sets to that total L2
        norm, as ``torch.nn.utils.clip_grad_norm_`` would after this backward, but folded into the
        weights: the combined gradient's squared norm is ``w^T G w`` and the heads' norm comes back
        with the Gramian, so clipping costs no pass over the gradients and no wait for the device
        (``self.last_grad_norm``: the norm before clipping, on the host).

        A non-finite Gramian (``self.last_gram_finite`` false) gets no solve and zero weights: the
        caller is to skip the step.
        """
        if max_norm is not None and (self.level != "param" or inv_scale is not None):
            raise ValueError("GradientBalancer.backward: max_norm needs level='param' and unscaled losses")
        self.last_grad_norm = None
        if self.level == "param":
            buffers = self._param_buffers(losses.shape[0])
            self._per_task_grads(losses, outputs, self.shared, self._rows)
            heads = self._heads
            if self._world_size() > 1:  # heads' gradients into the flat tensor: one all-reduce for all
                torch._foreach_copy_(self._head_grads, [p.grad for p in heads])
                self._average_across_processes(self._flat)
                for p, g in zip(heads, self._head_grads):
                    p.grad = g
            head_norm = None
            if max_norm is not None:  # comes to the host with the Gramian
                head_norm = buffers[0].new_zeros(()) if not heads else torch.linalg.vector_norm(
                    torch.stack(torch._foreach_norm([p.grad for p in heads])))
            head_norm = self._solve_on_host(buffers, inv_scale, read_with_gram=read_with_gram,
                                            extra=head_norm)
            w_host = self.last_weights_host
            if self.last_gram_finite and max_norm is not None:
                w_host = w_host * self._clip_factor([p.grad for p in heads], head_norm, max_norm)
            w = self._to_device(w_host)
            if not self.last_gram_finite:
                return w
            weighted_sum(buffers, w, out=self._combined)
            for p, g in zip(self.shared, self._combined_grads):
                p.grad = g
            return w
        if features is None or head_inputs is None:
            raise ValueError("GradientBalancer(level='rep').backward needs features and head_inputs")
        T = losses.shape[0]
        buffers = [f.new_empty((T, *f.shape)) for f in head_inputs]
        self._per_task_grads(losses, outputs, head_inputs, [[buf[t] for buf in buffers] for t in range(T)])
        self._solve_on_host(buffers, inv_scale, sum_across_processes=True, read_with_gram=read_with_gram)
        w = self._to_device(self.last_weights_host)
        if not self.last_gram_finite:
            return w
        torch.autograd.backward(list(features), weighted_sum(buffers, w))
        if self._world_size() > 1:  # the local batch's share of every parameter's gradient, averaged
            params = [*self.shared, *self._heads]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            self._average_across_processes(flat)
            # back into the gradients as they are laid out (channels_last stays channels_last)
            averaged = torch.split(flat, [q.numel() for q in params])
            torch._foreach_copy_(grads, [v.view(p.shape) for v, p in zip(averaged, params)])
            for p, g in zip(params, grads):
                p.grad = g
        return w
