"""The loss weightings that learn their weights with an Adam step of their own: GradNorm (per-task
gradient norms of the last shared layer) and FAMO (the log-loss decrease after each update)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional

import torch
from torch import Tensor

from ..distributed import world_size
from ..registry import BALANCERS
from .weighting import LossWeighting

__all__ = ["FAMO", "GradNorm"]


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
