"""Builders and checks for the training loop: device, seeding, data loaders, optimizer, LR schedule, the
tasks against the model's heads, the input size against the backbone."""

from __future__ import annotations

import atexit
import math
import os
import random
import signal
import weakref
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..config import ConfigError, OptimizerConfig, ScheduleConfig
from ..data import collate_samples

__all__ = [
    "LRLambda",
    "build_dataloader",
    "build_optimizer",
    "build_scheduler",
    "check_amp",
    "check_train_switches",
    "check_input_size",
    "compile_model",
    "release_workers",
    "check_tasks",
    "resolve_device",
    "seed_everything",
    "seed_worker",
]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available else cpu; ``"cuda"`` without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA device is available (use auto or cpu)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive ``random`` and NumPy seeds from the worker's torch seed
    (itself drawn from the loader's generator), so augmentation randomness repeats run to run.

    The worker leaves the trainer's process group and ignores SIGTERM / SIGINT, so that a preemption
    signal, whether sent to the process group (torchrun, Ctrl-C), to every process of a cgroup
    (systemd, Slurm's proctrack/cgroup) or to the worker itself, never kills a worker under the main
    process: the main process finishes its step, saves, and shuts its workers down through their queues
    (``Trainer.train``; and at interpreter exit, :func:`build_dataloader`'s exit hook). A worker whose
    main process is gone exits by itself (torch's worker watchdog)."""
    os.setpgrp()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def build_dataloader(dataset: Dataset, batch_size: int, num_workers: int, *, train: bool,
                     seed: int = 0, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A loader of ``collate_samples`` batches for process ``rank`` of ``world_size``.

    ``batch_size`` is the global batch (``data.batch_size``): each process loads ``batch_size /
    world_size`` samples per step, so the same config trains the same way on any number of processes.
    Training: a :class:`~mtvision.data.samplers.TrainSampler` (seeded per epoch, resumable mid-epoch
    through ``loader.sampler.set_epoch(epoch, start_batch)``; samples come with their augmentation seed),
    workers kept alive across epochs. Evaluation: in order, every sample exactly once over all processes
    (:class:`~mtvision.data.samplers.ShardSampler`). ConfigError when the global batch does not split
    evenly or a training set is smaller than one global batch.
    """
    from ..data.samplers import ShardSampler, TrainSampler

    if batch_size % world_size:
        raise ConfigError(f"data.batch_size ({batch_size}) is the global batch and must be divisible by the "
                          f"number of processes ({world_size})")
    local_batch = batch_size // world_size
    if train and len(dataset) < batch_size:
        raise ConfigError(f"data.batch_size ({batch_size}) is larger than the training set "
                          f"({len(dataset)} samples, data.num_train)")
    generator = torch.Generator()
    generator.manual_seed(seed)
    if train:
        sampler = TrainSampler(dataset, world_size, rank, seed=seed, batch_size=local_batch)
        sampler.set_epoch(0)
    else:
        sampler = ShardSampler(dataset, world_size, rank)
    loader = DataLoader(
        dataset,
        batch_size=local_batch,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_samples,
        drop_last=train,
        worker_init_fn=seed_worker,
        generator=generator,
        persistent_workers=train and num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    if train and num_workers > 0:  # persistent workers; an evaluation loader's end with their epoch
        # Workers ignore SIGTERM (see seed_worker), and multiprocessing's own exit handler stops its children
        # with SIGTERM and waits for them: a persistent iterator still alive then would never end. This hook,
        # registered later, runs first and shuts the workers down through their queues.
        atexit.register(release_workers, weakref.ref(loader))
    return loader


def release_workers(loader) -> None:
    """Shut down the worker processes of ``loader`` (a DataLoader or a weak reference to one) that a
    persistent iterator keeps alive, through their queues (they ignore SIGTERM)."""
    loader = loader() if isinstance(loader, weakref.ref) else loader
    if loader is not None and getattr(loader, "_iterator", None) is not None:
        loader._iterator._shutdown_workers()  # what its __del__ does; torch keeps it private
        loader._iterator = None


def _param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict[str, Any]]:
    """Backbone vs other parameters (``lr * backbone_lr_mult`` for the backbone), each split into
    decayed weights and undecayed 1-D parameters (biases, norm scales), as is usual for AdamW."""
    backbone = getattr(model, "backbone", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if isinstance(backbone, nn.Module) else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        groups.setdefault((id(p) in backbone_ids, p.ndim > 1), []).append(p)
    out = []
    for (is_backbone, decay), params in sorted(groups.items()):
        out.append({
            "params": params,
            "lr": cfg.lr * (cfg.backbone_lr_mult if is_backbone else 1.0),
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "name": f"{'backbone' if is_backbone else 'heads'}{'' if decay else '_no_decay'}",
        })
    return out


def _fused_update_supported(params: list[torch.Tensor]) -> bool:
    """True where torch has fused optimizer kernels for every parameter (floating point, on one of the
    devices torch lists for them)."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a torch that moved the (private) list: the two devices every release has
        devices = {"cpu", "cuda"}
    return all(p.is_floating_point() and p.device.type in devices for p in params)


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum, Nesterov off) over ``model``'s trainable parameters (see ``_param_groups``).

    ``cfg.fused`` picks torch's fused update where the parameters' device has one: on this project's
    CPU it makes the AdamW update of a ResNet-18 5x faster than the default, and on a GPU it is one
    kernel per chunk instead of one per foreach op (see ``tools/benchmark.py --only step``)."""
    groups = _param_groups(model, cfg)
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameter")
    fused = cfg.fused and _fused_update_supported([p for g in groups for p in g["params"]])
    kw = {"fused": True} if fused else {}
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **kw)
    raise ConfigError(f"optimizer.name: unknown optimizer {cfg.name!r} (choose from: adamw, sgd)")


class LRLambda:
    """LR factor of iteration ``it`` (0-based; the LR of the step that updates to ``it + 1``).

    Linear warm-up from ``warmup_factor`` to 1 over ``warmup_iters``, then over the remaining
    ``max_iters - warmup_iters`` iterations (progress ``t`` in [0, 1]):
    ``cosine``: ``m + (1 - m) * (1 + cos(pi t)) / 2``; ``poly``: ``m + (1 - m) * (1 - t) ** power``;
    ``constant``: 1; with ``m = min_lr_ratio``. A plain object (numbers only), so a LambdaLR holding it
    saves into a ``weights_only`` checkpoint.
    """

    def __init__(self, cfg: ScheduleConfig, max_iters: int):
        self.name = cfg.name
        self.warmup_iters = int(cfg.warmup_iters)
        self.warmup_factor = float(cfg.warmup_factor)
        self.power = float(cfg.power)
        self.min_lr_ratio = float(cfg.min_lr_ratio)
        self.max_iters = int(max_iters)

    def __call__(self, it: int) -> float:
        if it < self.warmup_iters:
            return self.warmup_factor + (1.0 - self.warmup_factor) * it / self.warmup_iters
        span = max(1, self.max_iters - self.warmup_iters)
        t = min(1.0, (it - self.warmup_iters) / span)
        m = self.min_lr_ratio
        if self.name == "cosine":
            return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * t))
        if self.name == "poly":
            return m + (1.0 - m) * (1.0 - t) ** self.power
        return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, max_iters: int):
    """A per-iteration ``LambdaLR`` (call ``.step()`` after every optimizer step) following ``LRLambda``.

    A warm-up longer than ``max_iters`` is allowed (a short run overriding ``train.max_iters`` then
    stays in warm-up)."""
    if cfg.name not in ("cosine", "poly", "constant"):
        raise ConfigError(f"schedule.name: unknown schedule {cfg.name!r} "
                          "(choose from: cosine, poly, constant)")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRLambda(cfg, max_iters))


def check_tasks(cfg) -> list[str]:
    """The training tasks ``cfg.data.tasks``, checked against the task registry and the model's heads.

    ConfigError when a task is not registered, when ``data.tasks`` and ``model.heads`` name different
    tasks, when a task refuses its head's config (``Task.check_config``: the ``det`` head must detect,
    class counts must equal ``data.num_classes``), or when ``loss.weights`` names another task.
    """
    from ..registry import TASKS

    tasks = list(cfg.data.tasks)
    for t in tasks:
        TASKS.lookup(t, "data.tasks")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"data.tasks: duplicate task in {tasks}")
    heads = cfg.model.heads or {}
    if set(heads) != set(tasks):
        raise ConfigError(f"data.tasks {tasks} and model.heads {list(heads)} must name the same tasks")
    for t in tasks:
        TASKS[t].check_config(t, heads[t] if isinstance(heads[t], dict) else {}, cfg)
    for t in cfg.loss.weights:
        if t not in tasks:
            raise ConfigError(f"loss.weights.{t}: no such task (data.tasks: {', '.join(tasks)})")
    auxiliary = list(cfg.train.auxiliary_tasks)
    for t in auxiliary:
        if t not in tasks:
            raise ConfigError(f"train.auxiliary_tasks: {t!r} is not a training task "
                              f"(data.tasks: {', '.join(tasks)})")
    if set(auxiliary) >= set(tasks):
        raise ConfigError(f"train.auxiliary_tasks: {auxiliary} leaves no main task to score "
                          f"(data.tasks: {', '.join(tasks)})")
    return tasks


def check_input_size(model: nn.Module, size) -> None:
    """ConfigError naming ``data.size`` when the backbone cannot take it: a ViT needs multiples of its
    patch size (checked before any work, not at the first forward)."""
    multiple = int(getattr(model, "patch_size", 1) or 1)
    if any(int(s) % multiple for s in size):
        fit = [max(multiple, round(int(s) / multiple) * multiple) for s in size]
        raise ConfigError(f"data.size: {list(size)} is not a multiple of the backbone's patch size "
                          f"{multiple} (a ViT's input must be); use e.g. data.size=[{fit[0]},{fit[1]}]")


def compile_model(model: nn.Module, retains_graph: bool) -> None:
    """``torch.compile`` the model's parts in place (``model.compile_parts()``: backbone, neck and heads, and
    an architecture's own modules; per submodule, so the state_dict keys stay and ``forward_features`` /
    ``forward_heads`` run compiled too; a cross-stitch backbone per stage). ``retains_graph``: the balancer walks the
    graph more than once, so compiled backward functions must not donate (free and reuse) their saved
    buffers after the first pass."""
    if retains_graph:
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
    for part in model.compile_parts():
        part.compile()


def check_train_switches(train, device: torch.device, world_size: int) -> None:
    """ConfigError naming the ``train.*`` key of a speed switch this setup cannot run: ``sync_bn`` with
    several processes needs CUDA (torch's SyncBatchNorm has no CPU kernel)."""
    if train.sync_bn and world_size > 1 and device.type != "cuda":
        raise ConfigError("train.sync_bn: SyncBatchNorm needs CUDA devices (torch has no CPU "
                          "implementation); set it to false on CPU, or use a model without BatchNorm (e.g. "
                          "model.backbone.timm_kwargs.norm_layer=groupnorm)")


def check_amp(amp: str, device: torch.device) -> str:
    """The mixed-precision mode to use: ``fp16`` needs CUDA (ConfigError on CPU); ``bf16`` runs on CUDA,
    and on CPU too (CPU autocast supports bfloat16)."""
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.amp: 'fp16' needs a CUDA device (device is {device.type}); "
                          "use bf16 or none")
    return amp
