"""The training step of the gradient-balancing methods: per-task gradients -> Gramian -> T weights ->
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
averaged with one more. The model these methods train is not wrapped in DDP (``uses_ddp`` is false):
DDP's reducer would average the gradients a second time.

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
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..distributed import world_size
from ..ops import gram_matrix
from ..tasks.outputs import as_output_lists, task_output_tensors
from .aggregators import GradientAggregator
from .step import Balancer, BalanceResult, Forward

__all__ = ["GradientBalancer", "GradientCombination"]


@dataclass
class GradientCombination:
    """What one :meth:`GradientBalancer.combine` decided.

    Attributes:
        weights: ``[T]`` on the device, what the shared gradients were combined with (the method's,
            times the clip factor when ``max_norm`` clipped).
        weights_host: the method's ``[T]``, float64 on the host, unclipped.
        gram_host: the Gramian, float64 on the host, unscaled, summed across processes.
        finite: the Gramian is finite (else no solve, zero weights: the caller skips the step).
        read: the host copy (float64) of the ``read_with_gram`` tensor, or ``None``.
        grad_norm: the total gradient norm before clipping (``max_norm`` given), else ``None``.
    """

    weights: Tensor
    weights_host: Tensor
    gram_host: Tensor
    finite: bool
    read: Optional[Tensor] = None
    grad_norm: Optional[float] = None


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


class GradientBalancer(Balancer):
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
        tasks: task names in loss order (for the logged values; default ``task0, task1, ...``).
    """

    uses_ddp = False
    retains_graph = True

    def __init__(self, aggregator: GradientAggregator, shared: Sequence[Tensor],
                 task_params: Sequence[Sequence[Tensor]], level: str = "param",
                 generator: Optional[torch.Generator] = None, distributed: Optional[bool] = None,
                 tasks: Optional[Sequence[str]] = None):
        if level not in ("param", "rep"):
            raise ValueError(f"balancer.level: expected 'param' or 'rep', got {level!r}")
        if level not in aggregator.levels:
            raise ValueError(f"balancer.level: {type(aggregator).__name__} is defined at the "
                             f"{' / '.join(aggregator.levels)} level only, got {level!r}")
        super().__init__(tasks if tasks is not None else [f"task{t}" for t in range(len(task_params))])
        self.aggregator = aggregator
        self.batches_per_step = int(aggregator.batches_per_step)
        self.shared = [p for p in shared if p.requires_grad]
        self.task_params = [[p for p in ps if p.requires_grad] for ps in task_params]
        self._heads = [p for ps in self.task_params for p in ps]
        self.level = level
        self.generator = generator
        self.distributed = distributed
        # the Gramian the method solves on is that of the raw task gradients of the shared parameters
        raw = (type(aggregator).prepare is GradientAggregator.prepare
               and type(aggregator).task_losses is GradientAggregator.task_losses)
        self.provides_gramian = level == "param" and self.batches_per_step == 1 and raw
        self._flat: Optional[Tensor] = None  # per-task shared rows, then the heads' gradients
        self._buffers: Optional[list[Tensor]] = None
        self._rows: Optional[list[list[Tensor]]] = None  # [t][k]: row t of buffer k (views made once)
        self._head_grads: Optional[list[Tensor]] = None
        self._combined: Optional[list[Tensor]] = None  # the op's output: contiguous, dims in memory order
        self._combined_grads: Optional[list[Tensor]] = None  # the same storage as the parameters' .grad

    # ------------------------------------------------------------------------------------------------
    # The Balancer interface

    def forward(self, model, images: Tensor) -> Forward:
        """At the ``rep`` level the heads run on detached copies of the shared features, so that the
        per-task backward passes stop there; at the ``param`` level a plain forward."""
        if self.level == "param":
            return Forward(model(images))
        features = model.forward_features(images)
        head_inputs = [f.detach().requires_grad_() for f in features]
        return Forward(model.forward_heads(head_inputs, images.shape[-2:]), features, head_inputs)

    def backward(self, losses, mean_losses, forward, extra=None, *, scaler=None,
                 max_norm=None) -> BalanceResult:
        fp16 = scaler is not None and scaler.is_enabled()
        T = len(self.tasks)
        forwards = forward if isinstance(forward, list) else [forward]
        m = mean_losses.float()
        if self.batches_per_step > 1:  # [K, T] -> K*T rows, batch-major; logged: the mean over the batches
            m, losses, mean_losses = m.mean(0), losses.reshape(-1), mean_losses.reshape(-1)
        # the logged values come back with the Gramian (the step's one wait for the device)
        read = torch.cat([m, m.sum().view(1), *([] if extra is None else [extra.float().reshape(-1)])])
        a = self.aggregator
        fold_clip = (max_norm is not None and self.level == "param" and not fp16 and a.linear
                     and not a.weights_task_params)
        if self.level == "rep":  # the weighted backward through the backbone accumulates: start clean
            for p in [*self.shared, *self._heads]:
                p.grad = None
        objective = a.task_losses(losses, mean_losses)
        c = self.combine(scaler.scale(objective) if fp16 else objective,
                         [o for f in forwards for o in task_output_tensors(f.outputs, self.tasks)],
                         forwards[0].features, forwards[0].head_inputs,
                         1.0 / scaler.get_scale() if fp16 else None, read_with_gram=read,
                         max_norm=max_norm if fold_clip else None, mean_losses=mean_losses)
        host = c.read.tolist()
        values = {t: host[i] for i, t in enumerate(self.tasks)}
        values["total"] = host[T]
        w = c.weights_host.tolist()  # K > 1: the rows of the batch the update uses (the others are 0)
        values.update({f"weight/{name}": sum(w[i::T]) for i, name in enumerate(self.tasks)})
        # a non-finite loss makes a non-finite Gramian; with fp16 the scaler finds those itself
        skip = not math.isfinite(host[T]) or (not fp16 and not c.finite)
        if c.grad_norm is not None:
            skip = skip or not math.isfinite(c.grad_norm)
        return BalanceResult(values, host[T + 1:], skip=skip, clipped=fold_clip, grad_norm=c.grad_norm,
                             gram=c.gram_host if self.provides_gramian else None)

    def state_dict(self):
        state = {} if self.generator is None else {"generator": self.generator.get_state()}
        method = self.aggregator.state_dict()
        if method:
            state["method"] = method
        return state

    def load_state_dict(self, state):
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"].cpu())
        if "method" in state:
            self.aggregator.load_state_dict(state["method"])

    # ------------------------------------------------------------------------------------------------
    # The per-task gradients, the Gramian and the combination

    def _world_size(self) -> int:
        return 1 if self.distributed is False else world_size()

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
    def _per_task_grads(self, losses: Tensor, outputs: Sequence[Sequence[Tensor]], inputs: Sequence[Tensor],
                        rows: Sequence[Sequence[Tensor]]) -> None:
        """``rows[t][k]`` := d losses[t] / d inputs[k]; task parameters' .grad := their task's gradient.

        Task t's loss reaches only task t's outputs (``outputs[t]``: its prediction, and a deep-supervised
        intermediate one where the model has it), so one backward of ``sum_t losses[t]`` to the outputs
        (the fused loss's single backward) gives every d L_t / d output_t; each task's backward then
        starts from its own outputs and never walks the other heads (backward from ``losses[t]`` would,
        carrying zeros). With K batches (``K*T`` rows, batch-major) a task's parameters get the mean of
        its K gradients, or their sum (the method's ``head_reduction``)."""
        R, T = losses.shape[0], len(self.task_params)
        n = len(inputs)
        outputs = as_output_lists(outputs)
        flat = [o for outs in outputs for o in outs]
        flat_grads = iter(torch.autograd.grad(losses.sum(), flat, retain_graph=True))
        output_grads = [[next(flat_grads) for _ in outs] for outs in outputs]
        for t in range(R):
            params = self.task_params[t % T]
            grads = torch.autograd.grad(list(outputs[t]), [*inputs, *params], grad_outputs=output_grads[t],
                                        retain_graph=t < R - 1, allow_unused=True)
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
                if t >= T:  # a later batch of a K-batch step
                    if g is not None:
                        p.grad.add_(g)
                    continue
                if g is None:
                    g = torch.zeros_like(p)
                elif g.stride() != p.stride():  # fused optimizers read .grad as flat memory in p's order
                    g = torch.empty_like(p).copy_(g)
                p.grad = g
        if R > T and self._heads and self.aggregator.head_reduction == "mean":
            torch._foreach_div_([p.grad for p in self._heads], R // T)

    def _solve_on_host(self, buffers: Sequence[Tensor], inv_scale: Optional[float],
                       sum_across_processes: bool = False, read_with_gram: Optional[Tensor] = None,
                       extra: Optional[Tensor] = None, stats: Optional[Tensor] = None
                       ) -> tuple[GradientCombination, Optional[float]]:
        """The method's weights from the Gramian of ``buffers``, solved on the host (``weights`` is
        still the host copy here). ``read_with_gram`` comes to the host in the same copy, and so do
        the method's ``stats`` (from ``prepare``) and the scalar ``extra``, whose value is returned
        second."""
        gram = gram_matrix(buffers)
        if sum_across_processes and self._world_size() > 1:
            # feature gradients of different samples are different coordinates: the global Gramian
            # is the sum of the local ones (scaled as the mean loss over the global batch)
            dist.all_reduce(gram)
            gram = gram / (self._world_size() ** 2)
        if inv_scale is not None:
            gram = gram * (inv_scale * inv_scale)
        # The T x T problem is solved on the host: one copy of T^2 numbers each way per step, instead of
        # the hundreds of tiny kernel launches an iterative solver makes on a GPU (measured on an H100:
        # MGDA / CAGrad / UPGrad steps 1.5-2.4x the passes they need when solved on the device). The
        # caller's small tensors (the trainer's logged losses, the heads' gradient norm) come back in
        # the same copy, so the step's first wait for the device is also its only one.
        T = gram.shape[0]
        parts = [gram.detach().reshape(-1)] + [x.detach().reshape(-1) for x in (read_with_gram, stats, extra)
                                                if x is not None]
        packed = torch.cat([x.to(torch.float64) for x in parts]).cpu()
        gram_host = packed[: T * T].view(T, T)
        at = T * T
        read = None if read_with_gram is None else packed[at: at + read_with_gram.numel()]
        at += 0 if read_with_gram is None else read_with_gram.numel()
        stats_host = None if stats is None else packed[at: at + stats.numel()].view(stats.shape)
        finite = bool(torch.isfinite(gram_host).all()) and (stats_host is None or
                                                            bool(torch.isfinite(stats_host).all()))
        if finite:
            w = self.aggregator.weights_from(gram_host, stats_host, self.generator)
        else:  # the caller skips this step; no solver sees a NaN
            w = torch.zeros(T, dtype=torch.float64)
        result = GradientCombination(w, w, gram_host, finite, read)
        return result, None if extra is None else float(packed[-1])

    def _weight_task_grads(self, weights: Tensor) -> None:
        """Each task's own parameters' gradients times its weight (methods that weight the losses)."""
        for params, w in zip(self.task_params, weights.tolist()):
            if params:
                torch._foreach_mul_([p.grad for p in params], w)

    @staticmethod
    def _clip_factor(c: GradientCombination, head_grads: Sequence[Tensor], head_norm: float,
                     max_norm: float) -> float:
        """``torch.nn.utils.clip_grad_norm_``'s factor for the combined shared gradient and the heads'
        gradients, with no pass over the shared gradient: its squared norm is ``w^T G w`` from the
        Gramian on the host. Scales the heads' gradients in place; the caller scales the weights."""
        w, gram = c.weights_host, c.gram_host
        total = math.sqrt(max(float(w @ gram @ w), 0.0) + head_norm * head_norm)
        c.grad_norm = total
        factor = min(1.0, max_norm / (total + 1e-6))
        if factor < 1.0 and head_grads:
            torch._foreach_mul_(list(head_grads), factor)
        return factor

    def combine(self, losses: Tensor, outputs: Sequence[Tensor], features: Optional[Sequence[Tensor]] = None,
                head_inputs: Optional[Sequence[Tensor]] = None, inv_scale: Optional[float] = None,
                read_with_gram: Optional[Tensor] = None, max_norm: Optional[float] = None,
                mean_losses: Optional[Tensor] = None) -> GradientCombination:
        """Sets ``.grad`` of every shared and task parameter from the per-task gradients combined with the
        method's weights; returns what was decided (:class:`GradientCombination`).

        ``losses``: the per-task losses ``[T]`` (graph alive; scaled under fp16); ``outputs``: each
        task's outputs (:func:`~mtvision.tasks.outputs.task_output_tensors`), in the same order (task t's
        loss depends on ``outputs[t]`` only). At the
        ``rep`` level also ``features`` (the backbone/neck outputs, graph alive) and ``head_inputs``
        (the detached leaves the heads were run on). ``read_with_gram``: a small tensor brought to the
        host together with the Gramian (``read``, float64).

        ``max_norm`` (parameter level, unscaled losses): clip the gradients this sets to that total L2
        norm, as ``torch.nn.utils.clip_grad_norm_`` would after this backward, but folded into the
        weights: the combined gradient's squared norm is ``w^T G w`` and the heads' norm comes back
        with the Gramian, so clipping costs no pass over the gradients and no wait for the device.

        ``mean_losses``: the losses averaged over processes (detached), for methods whose ``prepare``
        reads them; default ``losses`` detached (unscaled with ``inv_scale``). With a method that draws
        K batches, ``losses`` and ``outputs`` hold the K batches' ``K*T`` entries, batch-major.

        A non-finite Gramian (``finite`` false) gets no solve and zero weights: the caller is to skip
        the step.
        """
        if max_norm is not None and (self.level != "param" or inv_scale is not None):
            raise ValueError("GradientBalancer.combine: max_norm needs level='param' and unscaled losses")
        a = self.aggregator
        if max_norm is not None and not a.linear:
            raise ValueError(f"GradientBalancer.combine: max_norm cannot be folded into {type(a).__name__}'s "
                             "element-wise combination")
        if mean_losses is None:
            mean_losses = losses.detach().float() * (1.0 if inv_scale is None else inv_scale)
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
            # a method that keeps gradients across steps keeps them unscaled (the fp16 scale changes)
            unscale = inv_scale is not None and type(a).prepare is not GradientAggregator.prepare
            if unscale:
                torch._foreach_mul_(buffers, inv_scale)
            rows, stats = a.prepare(buffers, mean_losses)
            c, head_norm = self._solve_on_host(rows, None if unscale else inv_scale,
                                                read_with_gram=read_with_gram, extra=head_norm, stats=stats)
            w_host = c.weights_host
            if c.finite and max_norm is not None:
                w_host = w_host * self._clip_factor(c, [p.grad for p in heads], head_norm, max_norm)
            if unscale:  # the combined gradient goes to GradScaler.step scaled, as the heads' are
                w_host = w_host / inv_scale
            c.weights = w_host.to(buffers[0].device, torch.float32, non_blocking=True)
            if not c.finite:
                return c
            if a.weights_task_params:
                self._weight_task_grads(c.weights_host)
            a.combine(rows, c.weights, self._combined, self.generator)
            for p, g in zip(self.shared, self._combined_grads):
                p.grad = g
            return c
        if features is None or head_inputs is None:
            raise ValueError("GradientBalancer(level='rep').combine needs features and head_inputs")
        T = losses.shape[0]
        buffers = [f.new_empty((T, *f.shape)) for f in head_inputs]
        self._per_task_grads(losses, outputs, head_inputs, [[buf[t] for buf in buffers] for t in range(T)])
        rows, stats = a.prepare(buffers, mean_losses)
        c, _ = self._solve_on_host(rows, inv_scale, sum_across_processes=True,
                                   read_with_gram=read_with_gram, stats=stats)
        c.weights = c.weights_host.to(buffers[0].device, torch.float32, non_blocking=True)
        if not c.finite:
            return c
        if a.weights_task_params:
            self._weight_task_grads(c.weights_host)
        combined = [f.new_empty(f.shape) for f in head_inputs]
        a.combine(rows, c.weights, combined, self.generator,
                  inputs=[f.detach() for f in features])
        torch.autograd.backward(list(features), combined)
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
        return c
