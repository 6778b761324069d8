"""One measurement of how the tasks relate on one batch: the per-task gradients of the shared
parameters (their Gramian: norms and cosines) and the lookahead inter-task affinity of TAG (Fifty et al.,
NeurIPS 2021),

    Z[i, j] = 1 - L_j(theta_s - lr * g_i, theta_j) / L_j(theta_s, theta_j),

the relative decrease of task j's loss on the batch after an SGD step of the shared parameters along task
i's gradient alone (task-specific parameters unchanged). ``Z[i, i]`` is task i's own lookahead decrease;
``Z[i, j] < 0`` means i's step raises j's loss.

The measurement leaves the training as it found it: the random state is reset before every forward (all
of them see the same dropout masks, and training continues with the state it had) and the module
buffers (BatchNorm running statistics) are restored. Under torch.distributed the gradients and losses are
averaged over processes (one all-reduce each), so every process gets what one process computes on the
global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..balancing.task_gradients import flat_task_gradients
from ..distributed import world_size
from ..ops import gram_matrix

__all__ = ["ProbeResult", "TaskGradientProbe"]


@dataclass
class ProbeResult:
    """One batch's task relations, float64 on the host.

    Attributes:
        losses: ``[T]`` the task losses at the current parameters (mean over processes).
        gram: ``[T,T]`` Gramian of the per-task gradients of the shared parameters.
        affinity: ``[T,T]`` lookahead affinity ``Z[i, j]`` (row: the task whose step is taken), or None
            when not asked for.
    """

    losses: Tensor
    gram: Tensor
    affinity: Tensor | None = None


class _RandomState:
    """Torch's CPU and CUDA random states, to reset before each forward and restore at the end."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and \
            torch.cuda.is_initialized() else None

    def reset(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class TaskGradientProbe:
    """Measures :class:`ProbeResult` for a model with ``shared`` parameters.

    Args:
        shared: the shared parameters (backbone and neck); the gradients and the lookahead step are
            taken on those that require a gradient.
        module: the model, whose buffers are restored after the measurement (None: none to restore).
        distributed: average over torch.distributed processes; None: when a group of more than one
            process is initialised.
    """

    def __init__(self, shared: Sequence[Tensor], module: nn.Module | None = None,
                 distributed: bool | None = None):
        self.shared = [p for p in shared if p.requires_grad]
        if not self.shared:
            raise ValueError("TaskGradientProbe: no shared parameter requires a gradient")
        self.module = module
        self.distributed = distributed
        self._rows: Tensor | None = None

    def _world(self) -> int:
        return 1 if self.distributed is False else world_size()

    def _mean_over_processes(self, x: Tensor) -> Tensor:
        if self._world() > 1:
            dist.all_reduce(x)
            x.div_(self._world())
        return x

    def measure(self, task_losses: Callable[[], Tensor], lookahead_lr: float | None = None,
                loss_scale: float = 1.0) -> ProbeResult | None:
        """``task_losses()``: a training forward of the batch, returning the ``[T]`` task losses (graph
        alive), or ``(losses, outputs)`` with each task's outputs (a list per task) when task t's loss depends on
        ``outputs[t]`` only (the per-task passes then start there); it runs once, then once more per
        task for the affinity (``lookahead_lr`` given: the SGD step size of the lookahead).
        ``loss_scale``: the losses are scaled by it for the backward passes (fp16 autocast: gradients that
        would underflow), the gradients unscaled after. None when the
        losses or gradients are not finite (every process agrees: they are averaged first)."""
        rng = _RandomState()
        buffers = [b.detach().clone() for b in self.module.buffers()] if self.module is not None else []
        try:
            return self._measure(task_losses, lookahead_lr, rng, float(loss_scale))
        finally:
            rng.reset()
            if buffers:
                with torch.no_grad():
                    torch._foreach_copy_(list(self.module.buffers()), buffers)

    @staticmethod
    def _call(task_losses) -> tuple[Tensor, list[Tensor] | None]:
        out = task_losses()
        return (out[0], list(out[1])) if isinstance(out, tuple) else (out, None)

    def _measure(self, task_losses, lookahead_lr, rng: _RandomState, scale: float) -> ProbeResult | None:
        rng.reset()
        losses, outputs = self._call(task_losses)
        T = losses.numel()
        sizes = [p.numel() for p in self.shared]
        ref = self.shared[0]
        if self._rows is None or self._rows.shape != (T, sum(sizes)):
            self._rows = torch.empty(T, sum(sizes), dtype=ref.dtype, device=ref.device)
        rows = flat_task_gradients(losses, self.shared, self._rows, scale, outputs=outputs)
        base = self._mean_over_processes(losses.detach().double().reshape(-1))
        self._mean_over_processes(rows)
        if scale != 1.0:
            rows.div_(scale)
        gram = gram_matrix(rows).double()
        packed = torch.cat([base, gram.reshape(-1)]).cpu()
        base_host, gram_host = packed[:T], packed[T:].view(T, T)
        if not bool(torch.isfinite(packed).all()):
            return None
        result = ProbeResult(base_host, gram_host)
        if lookahead_lr is None:
            return result
        saved = [p.detach().clone() for p in self.shared]
        after = torch.empty(T, T, dtype=torch.float64, device=ref.device)
        for i in range(T):
            with torch.no_grad():
                try:
                    torch._foreach_add_(self.shared, [c.view_as(p) for c, p in
                                                      zip(torch.split(rows[i], sizes), self.shared)],
                                        alpha=-float(lookahead_lr))
                    rng.reset()
                    after[i] = self._call(task_losses)[0].detach().double().reshape(-1)
                finally:  # the parameters the step starts from, whatever happened
                    torch._foreach_copy_(self.shared, saved)
        after_host = self._mean_over_processes(after).cpu()
        if not bool(torch.isfinite(after_host).all()):
            return None
        result.affinity = 1.0 - after_host / base_host.view(1, T)
        return result
