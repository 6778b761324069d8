"""Loss weighting: per-task loss weights decided from the task losses (EW, UW, DWA, RLW here; GradNorm and
FAMO in ``learned_weighting.py``).

Every method is a :class:`LossWeighting` (an ``nn.Module``: move it to the training device with
``.to(device)``; its learned state, optimiser moments and counters are in ``state_dict()``, plain data that
loads with ``torch.load(..., weights_only=True)``). The training loop drives it through
``mtvision.balancing.step.LossWeightingBalancer``, which does this::

    bal = BALANCERS[name](num_tasks, **kwargs).to(device)
    # once, when building the optimiser: only UW has parameters the model's optimiser must train
    if list(bal.parameters()):
        optimizer.add_param_group({"params": list(bal.parameters()), "weight_decay": 0.0})

    # every step
    losses = task_losses(model(x), batch)                 # [T] float32, differentiable
    w = bal.weights(losses.detach())                      # [T], detached, no host sync
    total = (w * losses).sum()
    extra = bal.extra_loss(losses)                        # UW only, else None
    if extra is not None:
        total = total + extra
    # ... check total is finite; if not, skip the step and call none of the hooks below ...
    if bal.requires_shared_parameters:                    # GradNorm: before backward (graph still alive)
        bal.pre_backward(losses, last_shared_layer_parameters)
    total.backward(); optimizer.step()
    new_losses = None
    if bal.requires_new_losses:                           # FAMO: same batch, after the step
        with torch.no_grad():
            new_losses = task_losses(model(x), batch)
    bal.update(losses.detach(), new_losses)               # DWA / FAMO; a no-op for the others
    # when a training epoch ends (DWA with window=None):
    bal.end_epoch()

``bal(losses)`` computes ``total`` (the weighted sum plus ``extra_loss``) in one call.

Under DDP every process must see the same losses for the state to stay identical across processes:
pass the task losses averaged over processes (one all-reduce of the ``[T]`` vector) to ``weights`` /
``extra_loss`` / ``update``; RLW needs the same ``seed`` on every process.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from ..registry import BALANCERS

__all__ = ["DWA", "EW", "LossWeighting", "RLW", "UW"]


class LossWeighting(nn.Module):
    """Base class: a rule giving the weight of each task loss at every step.

    ``total = sum_t weights(L)[t] * L[t] + extra_loss(L)`` is what the model is trained on. Subclasses
    implement :meth:`weights` and, where the method needs them, the hooks below (the base versions do
    nothing). See the module docstring for the order the training loop calls them in.

    Attributes:
        num_tasks: T.
        requires_shared_parameters: the loop must call :meth:`pre_backward` before the backward pass.
        requires_new_losses: :meth:`update` needs the losses of the same batch after the optimiser step.
    """

    requires_shared_parameters: bool = False
    requires_new_losses: bool = False

    def __init__(self, num_tasks: int):
        super().__init__()
        if int(num_tasks) != num_tasks or num_tasks < 1:
            raise ValueError(f"{type(self).__name__}: num_tasks must be a positive integer, "
                             f"got {num_tasks!r}")
        self.num_tasks = int(num_tasks)

    def _check(self, task_losses: Tensor, what: str = "task_losses") -> None:
        if not isinstance(task_losses, Tensor) or task_losses.shape != (self.num_tasks,):
            is_tensor = isinstance(task_losses, Tensor)
            shape = tuple(task_losses.shape) if is_tensor else type(task_losses).__name__
            raise ValueError(f"{type(self).__name__}: {what} must be a tensor of shape [{self.num_tasks}] "
                             f"(one loss per task), got {shape}")

    def weights(self, task_losses: Tensor) -> Tensor:
        """Weights ``[T]`` (float32, detached, on ``task_losses.device``) for this step's
        ``task_losses [T]``."""
        raise NotImplementedError(f"{type(self).__name__} does not define weights()")

    def extra_loss(self, task_losses: Tensor) -> Optional[Tensor]:
        """A scalar added to the weighted sum (the method's own objective terms), or ``None``."""
        return None

    def pre_backward(self, task_losses: Tensor, shared_parameters: Iterable[Tensor]) -> None:
        """Called before the backward pass with the differentiable ``task_losses`` when
        ``requires_shared_parameters``; the base version does nothing."""
        return None

    def update(self, task_losses: Tensor, new_task_losses: Optional[Tensor] = None) -> None:
        """Called after the optimiser step with this step's (detached) ``task_losses`` and, when
        ``requires_new_losses``, the losses of the same batch after the step; the base version does
        nothing."""
        return None

    def end_epoch(self) -> None:
        """Called when a training epoch ends; the base version does nothing."""
        return None

    def forward(self, task_losses: Tensor) -> Tensor:
        """``sum_t w_t L_t + extra_loss`` for differentiable ``task_losses [T]`` (``w`` from ``weights``)."""
        self._check(task_losses)
        w = self.weights(task_losses.detach())
        total = (w.to(task_losses.dtype) * task_losses).sum()
        extra = self.extra_loss(task_losses)
        return total if extra is None else total + extra

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}"


@BALANCERS.register("ew")
class EW(LossWeighting):
    """Equal (static) weights: ``w_t`` fixed, 1.0 each unless ``weights`` gives them (the config's
    ``loss.weights``). Nothing to call besides ``weights``; no state (the weights come from the config).

    Args:
        num_tasks: T.
        weights: ``T`` non-negative floats; default all 1.0.
    """

    def __init__(self, num_tasks: int, weights: Optional[Sequence[float]] = None):
        super().__init__(num_tasks)
        values = [1.0] * self.num_tasks if weights is None else [float(w) for w in weights]
        if len(values) != self.num_tasks:
            raise ValueError(f"EW: weights has {len(values)} entries, expected {self.num_tasks} "
                             "(one per task)")
        if not all(v >= 0.0 and v != float("inf") for v in values):
            raise ValueError(f"EW: weights must be finite and >= 0, got {values}")
        self.register_buffer("static_weights", torch.tensor(values, dtype=torch.float32), persistent=False)

    def weights(self, task_losses: Tensor) -> Tensor:
        self._check(task_losses)
        return self.static_weights.to(task_losses.device)


@BALANCERS.register("uw")
class UW(LossWeighting):
    """Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018), learned log-variances ``s = log sigma^2``.

    Objective: ``sum_t 0.5 * exp(-s_t) * L_t + 0.5 * s_t``, i.e. the paper's regression form
    ``L / (2 sigma^2) + log sigma`` for every task. The 1/2 factors and the initial value ``s_t = -0.5``
    follow LibMTL's ``UW`` (the Nash-MTL/FAMO code uses the same 1/2 factors with ``s_t = 0``); the paper
    uses ``L / sigma^2`` for classification tasks, which only rescales that task's ``s``.

    ``weights`` returns ``0.5 * exp(-s)`` (detached). ``extra_loss(L)`` has the value ``0.5 * sum_t s_t``
    and the gradient with respect to ``s`` of the whole objective (the weighted-sum part through ``s`` is
    added with a zero-valued term ``(w(s) - w(s).detach()) * L.detach()``), so
    ``sum_t w_t L_t + extra_loss`` equals the objective in value and in gradient for the model and ``s``.

    Trainer: put ``self.parameters()`` (``log_vars``) in the model's optimiser (own param group, weight decay
    0; the Nash-MTL/FAMO experiments use Adam with lr 0.025 for it) and add ``extra_loss`` to the total.
    No ``update``.

    Args:
        num_tasks: T.
        init_log_var: initial ``s_t`` (LibMTL: -0.5).
    """

    def __init__(self, num_tasks: int, init_log_var: float = -0.5):
        super().__init__(num_tasks)
        self.log_vars = nn.Parameter(torch.full((self.num_tasks,), float(init_log_var), dtype=torch.float32))

    def _w(self) -> Tensor:
        return 0.5 * torch.exp(-self.log_vars)

    def weights(self, task_losses: Tensor) -> Tensor:
        self._check(task_losses)
        return self._w().detach().to(task_losses.device)

    def extra_loss(self, task_losses: Tensor) -> Tensor:
        self._check(task_losses)
        w = self._w()
        losses = task_losses.detach().to(device=w.device, dtype=w.dtype)
        return 0.5 * self.log_vars.sum() + ((w - w.detach()) * losses).sum()


@BALANCERS.register("dwa")
class DWA(LossWeighting):
    """Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention",
    CVPR 2019).

    ``w_t = T * softmax_t(r / temp)`` with ``r_t = Lbar_t(k-1) / Lbar_t(k-2)``, where ``Lbar_t(k)`` is the
    mean training loss of task ``t`` over window ``k`` (an epoch in the paper); equal weights (1.0) during
    the first two windows. As in the authors' code (lorenmt/mtan), the averages are of the losses each
    step trained on (before its update) and the weights sum to T. A ratio whose previous average is 0
    (undefined in the paper) is taken as 1.

    Trainer: ``update(task_losses)`` after every step (accumulates on the device) and either
    ``end_epoch()`` at every epoch end (``window=None``) or nothing more (``window=N``: a window closes
    itself after N updates). Weights change only when a window closes.

    Args:
        num_tasks: T.
        temp: softmax temperature (paper: 2.0).
        window: steps per averaging window; ``None`` uses epochs (``end_epoch``).
    """

    def __init__(self, num_tasks: int, temp: float = 2.0, window: Optional[int] = None):
        super().__init__(num_tasks)
        if not float(temp) > 0.0:
            raise ValueError(f"DWA: temp must be > 0, got {temp!r}")
        if window is not None and (int(window) != window or window < 1):
            raise ValueError(f"DWA: window must be a positive integer or None, got {window!r}")
        self.temp = float(temp)
        self.window = None if window is None else int(window)
        t = self.num_tasks
        self.register_buffer("loss_sum", torch.zeros(t, dtype=torch.float64))
        self.register_buffer("avg_prev", torch.zeros(t, dtype=torch.float32))  # Lbar(k-2)
        self.register_buffer("avg_last", torch.zeros(t, dtype=torch.float32))  # Lbar(k-1)
        self.register_buffer("current", torch.ones(t, dtype=torch.float32))
        self.steps_in_window = 0
        self.windows_done = 0

    def weights(self, task_losses: Tensor) -> Tensor:
        self._check(task_losses)
        return self.current.to(task_losses.device, copy=True)

    def update(self, task_losses: Tensor, new_task_losses: Optional[Tensor] = None) -> None:
        self._check(task_losses)
        self.loss_sum.add_(task_losses.detach().to(self.loss_sum.dtype))
        self.steps_in_window += 1
        if self.window is not None and self.steps_in_window >= self.window:
            self._close_window()

    def end_epoch(self) -> None:
        if self.steps_in_window > 0:
            self._close_window()

    def _close_window(self) -> None:
        self.avg_prev.copy_(self.avg_last)
        self.avg_last.copy_(self.loss_sum / self.steps_in_window)
        self.loss_sum.zero_()
        self.steps_in_window = 0
        self.windows_done += 1
        if self.windows_done >= 2:
            ratio = torch.where(self.avg_prev > 0, self.avg_last / self.avg_prev.clamp_min(1e-30),
                                torch.ones_like(self.avg_last))
            self.current.copy_(self.num_tasks * torch.softmax(ratio / self.temp, dim=0))

    def get_extra_state(self) -> dict:
        return {"steps_in_window": self.steps_in_window, "windows_done": self.windows_done}

    def set_extra_state(self, state: dict) -> None:
        self.steps_in_window = int(state["steps_in_window"])
        self.windows_done = int(state["windows_done"])

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, temp={self.temp}, window={self.window}"


@BALANCERS.register("rlw")
class RLW(LossWeighting):
    """Random loss weighting (Lin et al., "Reasonable Effectiveness of Random Weighting", 2021/TMLR 2022).

    Every call of ``weights`` draws ``z ~ N(0, I_T)`` and returns ``softmax(z)`` (weights sum to 1, as in
    the paper and LibMTL's ``RLW`` with its default normal distribution).

    The draws come from ``generator`` if given, else from a generator created on the losses' device on the
    first call and seeded with ``seed``; its state is in ``state_dict`` so a resumed run continues the same
    sequence (on the same device type). Nothing to call besides ``weights``.

    Args:
        num_tasks: T.
        seed: seed of the generator made here (use the same on every DDP process).
        generator: a ``torch.Generator`` to draw from instead.
    """

    def __init__(self, num_tasks: int, seed: int = 0, generator: Optional[torch.Generator] = None):
        super().__init__(num_tasks)
        self.seed = int(seed)
        self.generator = generator
        self._own_generator = generator is None  # made here from ``seed`` (else the caller's, never reseeded)
        self._pending_state: Optional[dict] = None

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self.generator = gen
        if self._pending_state is not None:
            self._restore(self._pending_state)
        return self.generator

    def _restore(self, state: dict) -> None:
        if state["device_type"] == self.generator.device.type:
            self.generator.set_state(state["state"].cpu())
        else:
            warnings.warn(f"RLW: the saved generator state is for {state['device_type']!r}, the generator "
                          f"is on {self.generator.device.type!r}; continuing from the seed instead",
                          stacklevel=3)
        self._pending_state = None

    def weights(self, task_losses: Tensor) -> Tensor:
        self._check(task_losses)
        gen = self._generator(task_losses.device)
        z = torch.randn(self.num_tasks, generator=gen, device=gen.device, dtype=torch.float32)
        return torch.softmax(z, dim=0).to(task_losses.device)

    def get_extra_state(self) -> dict:
        if self._pending_state is not None:
            return dict(self._pending_state)
        if self.generator is None:
            return {"device_type": None, "state": None}
        return {"device_type": self.generator.device.type, "state": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        if state.get("state") is None:
            self._pending_state = None
            if self.generator is not None and self._own_generator:
                self.generator.manual_seed(self.seed)
            return
        self._pending_state = {"device_type": state["device_type"], "state": state["state"]}
        if self.generator is not None:
            self._restore(self._pending_state)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, seed={self.seed}"
