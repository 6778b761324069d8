"""Loss weighting: per-task loss weights decided from the task losses (EW, UW, DWA, GradNorm, RLW, FAMO).

Every method is a :class:`LossWeighting` (an ``nn.Module``: move it to the training device with
``.to(device)``; its learned state, optimiser moments and counters are in ``state_dict()``, plain data that
loads with ``torch.load(..., weights_only=True)``). The training loop drives it like this::

    bal = LOSS_WEIGHTINGS[name](num_tasks, **kwargs).to(device)
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

from ..distributed import world_size
from ..registry import BALANCERS

__all__ = ["DWA", "EW", "FAMO", "GradNorm", "LossWeighting", "RLW", "UW"]


def _adam_step(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, lr: float,
               betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One in-place step of ``torch.optim.Adam`` (L2 ``weight_decay`` added to the gradient, no amsgrad) on
    buffers. ``step`` is a 0-d float tensor, so the bias corrections stay on the device (no host sync)."""
    beta1, beta2 = betas
    if weight_decay != 0.0:
        grad = grad + weight_decay * param
    step.add_(1.0)
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias_correction1 = 1.0 - torch.pow(beta1, step)
    bias_correction2 = 1.0 - torch.pow(beta2, step)
    denom = exp_avg_sq.sqrt() / bias_correction2.sqrt() + eps
    param.sub_(lr * exp_avg / (bias_correction1 * denom))


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


@BALANCERS.register("gradnorm")
class GradNorm(LossWeighting):
    """GradNorm (Chen et al., ICML 2018): learned weights that equalise the tasks' training rates.

    At every step, with ``W`` the last shared layer's parameters:
    ``G_t = w_t * ||grad_W L_t||``, ``Gbar = mean_t G_t``, ``Ltilde_t = L_t(now) / L_t(0)``,
    ``r_t = Ltilde_t / mean(Ltilde)``, ``L_grad = sum_t |G_t - Gbar * r_t^alpha|`` with the targets held
    constant; ``w`` takes one optimiser step on ``dL_grad/dw_t = sign(G_t - target_t) * ||grad_W L_t||``, then
    is renormalised to sum to T. The step's loss uses the weights from before that update (the paper's
    Algorithm 1). ``L_t(0)`` is the loss of the first step seen (the paper's initial loss; LibMTL instead
    uses the first epoch's mean and trains that epoch with equal weights).

    There is no released code from the authors; the choices the paper leaves open are ours: ``w`` is
    updated by its own Adam (``lr``, default 0.025) rather than by the model's optimiser (which would mix
    it with the model's schedule, weight decay and AMP loss scale), the paper's direct parameterisation of
    ``w`` is kept (LibMTL uses ``T * softmax(logits)``), and after the step ``w`` is clamped to ``>= 1e-6``
    before the renormalisation so that no weight turns negative.

    Trainer: ``pre_backward(task_losses, last_shared_params)`` once per step, after ``weights`` and before
    the backward pass (it runs T ``autograd.grad`` calls with ``retain_graph=True`` restricted to
    ``last_shared_params`` and updates ``w``). No ``update``. ``last_grad_loss`` holds the step's ``L_grad``.

    Args:
        num_tasks: T.
        alpha: restoring-force strength (1.5 as in the paper's NYUv2 experiments).
        lr, betas, eps: Adam hyper-parameters for ``w``.
    """

    requires_shared_parameters = True

    def __init__(self, num_tasks: int, alpha: float = 1.5, lr: float = 0.025,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(num_tasks)
        if not float(lr) > 0.0:
            raise ValueError(f"GradNorm: lr must be > 0, got {lr!r}")
        self.alpha, self.lr, self.eps = float(alpha), float(lr), float(eps)
        self.betas = (float(betas[0]), float(betas[1]))
        t = self.num_tasks
        self.register_buffer("task_weights", torch.ones(t, dtype=torch.float32))
        self.register_buffer("initial_losses", torch.zeros(t, dtype=torch.float32))
        self.register_buffer("exp_avg", torch.zeros(t, dtype=torch.float32))
        self.register_buffer("exp_avg_sq", torch.zeros(t, dtype=torch.float32))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.float32))
        self.initialized = False
        self.last_grad_loss: Optional[Tensor] = None

    def weights(self, task_losses: Tensor) -> Tensor:
        self._check(task_losses)
        # A copy: pre_backward updates task_weights in place while this step's graph still holds the weights.
        return self.task_weights.to(task_losses.device, copy=True)

    def grad_norms(self, task_losses: Tensor, shared_parameters: Sequence[Tensor]) -> Tensor:
        """``||grad_W L_t||_2`` over all ``shared_parameters`` together, ``[T]`` float32 (graph retained)."""
        norms = []
        for t in range(self.num_tasks):
            grads = torch.autograd.grad(task_losses[t], shared_parameters, retain_graph=True,
                                        allow_unused=True)
            sq = [g.detach().float().pow(2).sum() for g in grads if g is not None]
            zero = task_losses.new_zeros((), dtype=torch.float32)
            norms.append(torch.stack(sq).sum().sqrt() if sq else zero)
        return torch.stack(norms)

    def pre_backward(self, task_losses: Tensor, shared_parameters: Iterable[Tensor]) -> None:
        self._check(task_losses)
        params = list(shared_parameters)
        if not params:
            raise ValueError("GradNorm.pre_backward: shared_parameters is empty "
                             "(pass the last shared layer's parameters)")
        if not task_losses.requires_grad:
            raise ValueError("GradNorm.pre_backward: task_losses carry no graph; pass the differentiable "
                             "losses, before the backward pass")
        if world_size() > 1:
            norms, losses = self._global_norms_and_losses(task_losses, params)
        else:
            norms = self.grad_norms(task_losses, params).to(self.task_weights.device)
            losses = task_losses.detach().float().to(self.task_weights.device)
        if not self.initialized:
            self.initial_losses.copy_(losses)
            self.initialized = True
        w = self.task_weights
        g = w * norms
        ratio = torch.where(self.initial_losses > 0, losses / self.initial_losses.clamp_min(1e-30),
                            torch.ones_like(losses))
        r = ratio / ratio.mean()
        target = g.mean() * r.pow(self.alpha)
        self.last_grad_loss = (g - target).abs().sum()
        grad = torch.sign(g - target) * norms
        _adam_step(w, grad, self.exp_avg, self.exp_avg_sq, self.adam_step, self.lr, self.betas, self.eps, 0.0)
        w.clamp_min_(1e-6)
        w.mul_(self.num_tasks / w.sum())

    def _global_norms_and_losses(self, task_losses: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Under torch.distributed: the norms of the per-task gradients averaged over processes (the
        gradients of the global batch's mean loss) and the averaged losses, in one all-reduce, so every
        process keeps the same weights."""
        rows = []
        for t in range(self.num_tasks):
            grads = torch.autograd.grad(task_losses[t], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).detach().float().reshape(-1)
                                   for g, p in zip(grads, params)]))
        flat = torch.cat([torch.stack(rows).reshape(-1), task_losses.detach().float()])
        torch.distributed.all_reduce(flat)
        flat /= world_size()
        grads, losses = flat[:-self.num_tasks].view(self.num_tasks, -1), flat[-self.num_tasks:]
        dev = self.task_weights.device
        return grads.norm(dim=1).to(dev), losses.to(dev)

    def get_extra_state(self) -> dict:
        return {"initialized": self.initialized}

    def set_extra_state(self, state: dict) -> None:
        self.initialized = bool(state["initialized"])

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, alpha={self.alpha}, lr={self.lr}"


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


@BALANCERS.register("famo")
class FAMO(LossWeighting):
    """Fast Adaptive Multitask Optimization (Liu, Liu, Ye & Liu, NeurIPS 2023), as in the authors' code
    (Cranial-XIX/FAMO, ``famo.py``).

    Learned logits ``xi`` (start at 0), ``z = softmax(xi)``, ``D_t = L_t - min_t + 1e-8``. The authors
    train on ``sum_t z_t log D_t / c`` with ``c = sum_t z_t / D_t`` (detached), whose gradient is that of
    ``sum_t w_t L_t`` with ``w_t = (z_t / D_t) / c``: ``weights`` returns these (they sum to 1), so the
    step equals the authors' step (only the logged total differs from theirs).

    After the optimiser step, with the losses ``L'`` of the same batch at the new parameters,
    ``delta_t = log D_t(L) - log D_t(L')`` and the logits take one Adam step (``lr``, L2
    ``weight_decay=gamma``) on the gradient ``J_softmax(xi)^T delta = z * (delta - <z, delta>)``.
    Defaults as in the authors' code: ``gamma = 0.01`` (``famo.py`` and their experiments' ``--gamma``),
    ``lr = 0.025`` (``--method-params-lr``), ``min_losses = 0``. The authors also clip the shared
    parameters' gradient norm at 1.0 (``max_norm``); that is the trainer's ``train.grad_clip``, not part of
    the weighting.

    Trainer: ``update(task_losses, new_task_losses)`` after every optimiser step, ``new_task_losses`` being
    the losses of the same batch recomputed under ``torch.no_grad()`` after the step (the authors' code; one
    extra forward per step). ``min_losses`` must lower-bound the losses.

    Args:
        num_tasks: T.
        gamma: weight decay (L2) of the logits.
        lr: Adam learning rate of the logits.
        min_losses: ``T`` lower bounds of the losses (default zeros).
        betas, eps: Adam hyper-parameters (torch defaults, as the authors).
    """

    requires_new_losses = True

    def __init__(self, num_tasks: int, gamma: float = 0.01, lr: float = 0.025,
                 min_losses: Optional[Sequence[float]] = None, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        super().__init__(num_tasks)
        if not float(lr) > 0.0:
            raise ValueError(f"FAMO: lr must be > 0, got {lr!r}")
        if not float(gamma) >= 0.0:
            raise ValueError(f"FAMO: gamma must be >= 0, got {gamma!r}")
        self.gamma, self.lr, self.eps = float(gamma), float(lr), float(eps)
        self.betas = (float(betas[0]), float(betas[1]))
        t = self.num_tasks
        mins = torch.zeros(t) if min_losses is None else torch.tensor([float(m) for m in min_losses])
        if mins.shape != (t,):
            raise ValueError(f"FAMO: min_losses has {mins.numel()} entries, expected {t} (one per task)")
        self.register_buffer("min_losses", mins.to(torch.float32))
        self.register_buffer("logits", torch.zeros(t, dtype=torch.float32))
        self.register_buffer("exp_avg", torch.zeros(t, dtype=torch.float32))
        self.register_buffer("exp_avg_sq", torch.zeros(t, dtype=torch.float32))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.float32))

    def _log_gap(self, losses: Tensor) -> Tensor:
        return (losses.detach().float().to(self.logits.device) - self.min_losses + 1e-8).log()

    def weights(self, task_losses: Tensor) -> Tensor:
        self._check(task_losses)
        z = torch.softmax(self.logits, dim=0)
        gap = task_losses.detach().float().to(self.logits.device) - self.min_losses + 1e-8
        q = z / gap
        return (q / q.sum()).to(task_losses.device)

    def update(self, task_losses: Tensor, new_task_losses: Optional[Tensor] = None) -> None:
        self._check(task_losses)
        if new_task_losses is None:
            raise ValueError("FAMO.update needs new_task_losses: the losses of the same batch recomputed "
                             "after the optimiser step")
        self._check(new_task_losses, "new_task_losses")
        delta = self._log_gap(task_losses) - self._log_gap(new_task_losses)
        z = torch.softmax(self.logits, dim=0)
        grad = z * (delta - (z * delta).sum())
        _adam_step(self.logits, grad, self.exp_avg, self.exp_avg_sq, self.adam_step, self.lr, self.betas,
                   self.eps, self.gamma)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, gamma={self.gamma}, lr={self.lr}"
