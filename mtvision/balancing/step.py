"""The one interface between the training loop and a balancing method: :class:`Balancer`.

The loop runs ``balancer.forward`` (the model's outputs, and whatever the method's backward needs),
computes the per-task losses, and hands them to ``balancer.backward``, which sets every parameter's
``.grad`` and returns a :class:`BalanceResult` (the weights used, whether the step must be skipped, the
values to log). After the optimizer step, ``balancer.after_update`` lets stateful methods learn.
Loss weightings (:class:`LossWeightingBalancer`: EW, UW, DWA, GradNorm, RLW, FAMO) and gradient methods
at the parameter or representation level (:class:`~mtvision.balancing.gradient_step.GradientBalancer`:
PCGrad, MGDA, CAGrad, ...) are its two implementations; the loop has no branch on which.
:func:`build_task_balancer` builds the one a config names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..distributed import mean_over_processes, world_size

__all__ = ["Balancer", "BalanceResult", "Forward", "LossWeightingBalancer", "build_task_balancer"]


@dataclass
class Forward:
    """What the training forward produced: ``outputs`` (task -> prediction) and, for a
    representation-level method, the shared ``features`` (graph alive) and the detached ``head_inputs``
    the heads ran on."""

    outputs: dict[str, Tensor]
    features: Optional[list[Tensor]] = None
    head_inputs: Optional[list[Tensor]] = None


@dataclass
class BalanceResult:
    """What ``Balancer.backward`` decided.

    Attributes:
        values: host floats to log: per task its loss (mean over processes), ``total`` (the objective
            the gradient is of) and ``weight/<task>``.
        extra: the host copy of the ``extra`` tensor the loop passed (read in the same device wait).
        skip: the loss or gradient is not finite: take no optimizer step.
        clipped: the gradients are already clipped to ``max_norm``.
        grad_norm: the total gradient norm before clipping, when known on the host.
        gram: the ``[T,T]`` Gramian (float64, host, unscaled) of the per-task gradients of the shared
            parameters, when the method computed it anyway (``Balancer.provides_gramian``).
    """

    values: dict[str, float]
    extra: list[float] = field(default_factory=list)
    skip: bool = False
    clipped: bool = False
    grad_norm: Optional[float] = None
    gram: Optional[Tensor] = None


class Balancer:
    """Base of the balancing step (see the module docstring).

    Attributes:
        tasks: task names in loss order.
        uses_ddp: the training forward runs through DDP's reducer (loss weightings); gradient methods
            average their per-task gradients themselves and run on the plain module.
        retains_graph: the backward walks the graph more than once (``torch.compile`` must then not
            donate saved buffers).
    """

    uses_ddp: bool = True
    retains_graph: bool = False
    #: batches one step draws: with K > 1 ``backward`` gets ``losses [K,T]`` and a list of K forwards
    batches_per_step: int = 1
    #: every ``backward`` returns the Gramian of the raw per-task gradients of the shared parameters
    #: (``BalanceResult.gram``): gradient monitoring costs nothing more
    provides_gramian: bool = False

    def __init__(self, tasks: Sequence[str]):
        self.tasks = list(tasks)

    def parameters(self) -> list[nn.Parameter]:
        """The method's own trainable parameters (UW's log-variances), trained by the model's optimizer."""
        return []

    def request_gramian(self) -> bool:
        """Ask the next ``backward`` for the Gramian of the per-task gradients of the shared parameters
        (``BalanceResult.gram``); False when this balancer cannot give it within its step."""
        return False

    def forward(self, model: Callable[[Tensor], dict[str, Tensor]], images: Tensor) -> Forward:
        """The training forward of ``model`` (the plain module, or its DDP wrapper when ``uses_ddp``)."""
        return Forward(model(images))

    def backward(self, losses: Tensor, mean_losses: Tensor, forward: Forward, extra: Optional[Tensor] = None,
                 *, scaler: Optional[torch.amp.GradScaler] = None, max_norm: Optional[float] = None
                 ) -> BalanceResult:
        """Set the ``.grad`` of every trainable parameter from ``losses [T]`` (graph alive; the local
        batch's); ``mean_losses [T]`` are the same averaged over processes (detached: what decisions and
        logs use); ``extra`` a small tensor to bring to the host in the same wait. Under fp16 the
        backward goes through ``scaler``. ``max_norm``: clipping the method may fold in. With
        ``batches_per_step`` K > 1: ``losses``/``mean_losses`` are ``[K,T]`` and ``forward`` a list."""
        raise NotImplementedError

    def after_update(self, mean_losses: Tensor, losses_after_update: Callable[[], Tensor]) -> None:
        """Called after an optimizer step that was taken; ``losses_after_update()`` gives the same batch's
        losses with the new weights (averaged over processes), for methods that need them (FAMO)."""

    def end_epoch(self) -> None:
        """Called when a training epoch ends."""

    def to(self, device: torch.device) -> "Balancer":
        return self

    def state_dict(self) -> dict[str, Any]:
        """The method's state (plain data, a ``weights_only`` checkpoint entry)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


def _weights_of(values: Sequence[float], tasks: Sequence[str]) -> dict[str, float]:
    return {f"weight/{t}": float(w) for t, w in zip(tasks, values)}


class LossWeightingBalancer(Balancer):
    """A :class:`~mtvision.balancing.weighting.LossWeighting` as a training step: one backward of
    ``sum_t w_t L_t (+ the method's extra term)``, through DDP's reducer when distributed.

    Args:
        weighting: the method (weights from the losses averaged over processes, so every process agrees).
        tasks: task names in loss order.
        last_shared: the last shared layer's parameters (GradNorm reads its per-task gradient norms).
        params: the trainable parameters whose ``.grad`` the backward sets (cleared first).
    """

    def __init__(self, weighting, tasks: Sequence[str], last_shared: Callable[[], list[Tensor]],
                 params: Sequence[Tensor], shared: Sequence[Tensor] = ()):
        super().__init__(tasks)
        self.weighting = weighting
        self._last_shared = last_shared
        self._params = list(params)
        self._shared = [p for p in shared if p.requires_grad]
        self._gramian_requested = False
        self._rows: Optional[Tensor] = None
        self.retains_graph = bool(weighting.requires_shared_parameters)

    def request_gramian(self) -> bool:
        """The next step also takes T - 1 per-task gradients of the shared parameters (backward passes
        with the graph retained) before its own backward; the last task's follows from the step's
        gradient ``sum_t w_t g_t`` (the methods' extra terms never reach the shared parameters), so a
        measurement costs T - 1 backward passes. Exact under DDP: the rows are averaged over processes,
        as DDP averages the step's gradient."""
        if not self._shared:
            return False
        self._gramian_requested = True
        return True

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.weighting.parameters() if p.requires_grad]

    def backward(self, losses, mean_losses, forward, extra=None, *, scaler=None,
                 max_norm=None) -> BalanceResult:
        w = self.weighting.weights(mean_losses)
        total = (w * losses).sum()
        extra_loss = self.weighting.extra_loss(losses)
        shown = (w.detach() * mean_losses).sum()
        if extra_loss is not None:
            total, shown = total + extra_loss, shown + extra_loss.detach()
        parts = [mean_losses.float(), shown.float().view(1), w.detach().float()]
        if extra is not None:
            parts.append(extra.float().reshape(-1))
        host = torch.cat(parts).tolist()  # waits for the forward: the finiteness check needs it
        T = len(self.tasks)
        values = {t: host[i] for i, t in enumerate(self.tasks)}
        values["total"] = host[T]
        values.update(_weights_of(host[T + 1: 2 * T + 1], self.tasks))
        result = BalanceResult(values, host[2 * T + 1:], skip=not math.isfinite(host[T]))
        for p in [*self._params, *self.parameters()]:
            p.grad = None
        measure, self._gramian_requested = self._gramian_requested, False  # this step's, taken or not
        if result.skip:
            return result
        if self.weighting.requires_shared_parameters:  # GradNorm: the last shared layer, graph alive
            self.weighting.pre_backward(losses, list(self._last_shared()))
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        weights = host[T + 1: 2 * T + 1]
        rows = self._task_rows(losses, forward, weights, scale) if measure else None
        (total if scaler is None else scaler.scale(total)).backward()
        if world_size() > 1:  # UW's log-variances are not in DDP: averaged here
            for p in self.parameters():
                if p.grad is not None:
                    p.grad = mean_over_processes(p.grad)
        if rows is not None:
            result.gram = self._gramian(rows, weights, scale)
        return result

    @staticmethod
    def _derived_task(weights: Sequence[float]) -> int:
        """The task whose gradient a measuring step derives from the step's: the largest weight."""
        return max(range(len(weights)), key=lambda t: abs(weights[t]))

    def _task_rows(self, losses: Tensor, forward: Forward, weights: Sequence[float], scale: float):
        """``[T, P]``: every task's gradient of the shared parameters but the derived one's, by backward
        passes that keep the graph for the step's own; None when every weight is 0 (nothing to derive
        from)."""
        from .task_gradients import flat_task_gradients
        from ..tasks.outputs import task_output_tensors

        derived = self._derived_task(weights)
        if weights[derived] == 0:
            return None
        T, P = losses.numel(), sum(p.numel() for p in self._shared)
        if self._rows is None or self._rows.shape != (T, P):
            self._rows = self._shared[0].new_empty(T, P)
        return flat_task_gradients(losses, self._shared, self._rows, scale, skip=(derived,),
                                   outputs=task_output_tensors(forward.outputs, self.tasks), keep_graph=True)

    def _gramian(self, rows: Tensor, weights: Sequence[float], scale: float) -> Tensor:
        """The rows averaged over processes, the derived one from the step's gradient (DDP averaged it),
        and their Gramian (unscaled, float64 on the host)."""
        from ..ops import gram_matrix

        derived = self._derived_task(weights)
        others = [t for t in range(rows.shape[0]) if t != derived]
        if world_size() > 1:
            rows[others] = mean_over_processes(rows[others])
        step = rows[derived]
        for chunk, p in zip(torch.split(step, [q.numel() for q in self._shared]), self._shared):
            if p.grad is None:
                chunk.zero_()
            else:
                chunk.copy_(p.grad.reshape(-1))
        for t in others:
            step.add_(rows[t], alpha=-float(weights[t]))
        step.div_(float(weights[derived]))
        return (gram_matrix(rows).double() / (scale * scale)).cpu()

    def after_update(self, mean_losses, losses_after_update) -> None:
        new = losses_after_update() if self.weighting.requires_new_losses else None
        self.weighting.update(mean_losses, new)

    def end_epoch(self) -> None:
        self.weighting.end_epoch()

    def to(self, device):
        self.weighting.to(device)
        return self

    def state_dict(self):
        return self.weighting.state_dict()

    def load_state_dict(self, state):
        self.weighting.load_state_dict(state)


def build_task_balancer(cfg, model, tasks: Sequence[str]) -> Balancer:
    """The :class:`Balancer` of ``cfg.balancer`` for ``model`` training ``tasks``: a loss weighting, or a
    gradient method at ``balancer.level`` param or rep. ConfigError naming the key when the name, an
    argument or the level is wrong. ``loss.weights`` (static weights) belong to ``ew`` only."""
    from ..config import ConfigError
    from . import build_balancer, is_gradient_method
    from .gradient_step import GradientBalancer

    name, kwargs = cfg.balancer.name, dict(cfg.balancer.kwargs)
    if name == "ew":
        kwargs.setdefault("weights", [float(cfg.loss.weights.get(t, 1.0)) for t in tasks])
    elif cfg.loss.weights:
        raise ConfigError(f"loss.weights: static task weights apply to balancer 'ew' only (balancer.name is "
                          f"{name!r}, which decides the weights itself)")
    try:
        method = build_balancer(name, len(tasks), **kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if not is_gradient_method(name):
        if cfg.balancer.level != "param":
            raise ConfigError(f"balancer.level: {cfg.balancer.level!r} is for gradient methods; "
                              f"{name!r} weights losses")
        return LossWeightingBalancer(method, tasks, model.last_shared_parameters,
                                     [p for p in model.parameters() if p.requires_grad],
                                     shared=list(model.shared_parameters()))
    if cfg.balancer.level not in method.levels:
        raise ConfigError(f"balancer.level: {name!r} is defined at the {' / '.join(method.levels)} level "
                          f"only, got {cfg.balancer.level!r}")
    if cfg.balancer.level == "rep" and not getattr(model, "rep_level", True):
        arch = (cfg.model.arch or {}).get("name", "hps")
        raise ConfigError(f"balancer.level: 'rep' measures gradients at a representation every task reads; "
                          f"model.arch.name {arch!r} gives each task its own network, so there is none: use "
                          "balancer.level=param")
    generator = torch.Generator().manual_seed(int(cfg.seed))  # the T x T problem is solved on the host
    return GradientBalancer(method, list(model.shared_parameters()),
                            [list(model.task_parameters(t)) for t in tasks], level=cfg.balancer.level,
                            generator=generator, tasks=tasks)
