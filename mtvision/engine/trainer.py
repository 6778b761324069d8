"""The training loop: one ``Trainer`` per experiment config, a step and the hooks around it."""

from __future__ import annotations

import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from ..balancing import build_task_balancer
from ..config import Config, config_to_dict
from ..data.builders import build_dataset
from ..data.check import check_datasets
from ..distributed import all_gather_objects, broadcast_parameters, init_distributed, mean_over_processes
from ..losses import MultiTaskLoss
from ..models import build_model
from ..tasks import build_tasks
from .builders import (build_dataloader, compile_model, release_workers, build_optimizer, build_scheduler,
                       check_amp, check_input_size, check_tasks, check_train_switches, resolve_device,
                       seed_everything)
from .checkpoint import restore_training_state, save_checkpoint, training_state
from .evaluator import evaluate_model
from .hooks import HookBase, TrainingError, default_hooks
from .utils import autocast_context, clip_grad_norm, write_json

__all__ = ["Trainer", "StepOutcome", "TrainingError", "autocast_context", "clip_grad_norm", "write_json"]


@dataclass
class StepOutcome:
    """One step as the hooks see it: the logged host ``values`` (per-task losses averaged over processes,
    ``total``, ``weight/<task>``), whether it was ``skipped`` (non-finite: no update), whether a process
    asked to ``stop``, and the unreadable samples dropped since the last step by any process
    (``data.skip_bad``; each a message naming the file)."""

    values: dict[str, float]
    skipped: bool = False
    stop: bool = False
    skipped_files: list[str] = field(default_factory=list)
    grad_norm: Optional[float] = None  # before clipping, when the balancer folded the clip in
    gram: Optional[Tensor] = None  # the per-task Gramian (host), when the balancer computed it anyway

    def as_dict(self) -> dict[str, float]:
        """``values`` with ``skipped`` and ``stop`` as 0/1 (one flat row, e.g. for a table)."""
        return {**self.values, "skipped": int(self.skipped), "stop": int(self.stop)}


class Trainer:
    """Trains ``build_model(cfg.model)`` on ``cfg.data`` with the method of ``cfg.balancer``.

    ``Trainer(cfg).train()`` runs ``cfg.train.max_iters`` iterations (one global batch each, looping over
    epochs) and returns the final validation metrics (flat ``"task/metric"``). Around the steps the hooks
    (``mtvision.engine.hooks``) fill the work dir (``config.yaml``, ``train.log``, ``tb/``, ``metrics.json``),
    evaluate and keep ``checkpoints/best.pth``, save ``checkpoints/last.pth`` (every ``checkpoint_interval``,
    at the end, on SIGTERM/SIGINT and when the run fails), and skip non-finite steps. Under ``torchrun`` every
    process builds the same Trainer: ``data.batch_size`` is the global batch, the balancer says whether the
    model trains through DDP, only rank 0 writes. ``resume(path)`` restores the whole training state
    (``engine.checkpoint``): on CPU N steps straight equal N/2 steps, a resume and N/2 more, bit for bit.

    Args:
        cfg: the experiment.
        console: echo log lines to stderr.
        progress: show a tqdm bar; ``None`` shows it only when stderr is a terminal.
        hooks: more hooks, run after the built-in ones.
    """

    def __init__(self, cfg: Config, *, console: bool = True, progress: Optional[bool] = None,
                 hooks: Sequence[HookBase] = ()):
        self.cfg = cfg
        self.tasks = check_tasks(cfg)
        self.device = resolve_device(cfg.train.device)
        self.env = init_distributed(self.device.type)
        if self.device.type == "cuda" and self.env.distributed:
            self.device = torch.device("cuda", self.env.local_rank)
        self.is_main = self.env.is_main
        self.amp = check_amp(cfg.train.amp, self.device)
        check_train_switches(cfg.train, self.device, self.env.world_size)
        self.autocast = autocast_context(self.amp, self.device)
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)

        seed_everything(cfg.seed)
        model = build_model(config_to_dict(cfg.model))
        check_input_size(model, cfg.data.size)
        if cfg.train.sync_bn and self.env.distributed:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.task_specs = build_tasks(self.tasks, cfg.data.num_classes, cfg.loss.ignore_index,
                                      self.model.heads)
        self.loss_fn = MultiTaskLoss(self.task_specs).to(self.device)
        self.balancer = build_task_balancer(cfg, self.model, self.tasks).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        if self.balancer.parameters():  # UW's log-variances train with the model, without weight decay
            self.optimizer.add_param_group({"params": self.balancer.parameters(), "weight_decay": 0.0})
        # listed once: walking the module tree for them every step is host work a fast GPU waits for
        self.trainable_params = [p for p in self.model.parameters() if p.requires_grad]
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.train.max_iters)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        if cfg.train.monitor_interval and not self.balancer.provides_gramian:
            self.balancer.retains_graph = True  # the measuring steps take per-task backward passes
        if cfg.train.compile:
            compile_model(self.model, self.balancer.retains_graph)
        self.forward_model = self.model  # what the training forward calls
        if self.env.distributed and self.balancer.uses_ddp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(self.model, device_ids=ids)
        elif self.env.distributed:
            broadcast_parameters(self.model)

        self.train_set = build_dataset(cfg.data, "train", cfg.seed)
        self.val_set = build_dataset(cfg.data, "val", cfg.seed)
        self.bad_samples = check_datasets(cfg.data.check, cfg.data.skip_bad, train=self.train_set,
                                          val=self.val_set)
        world, rank = self.env.world_size, self.env.rank
        self.train_loader = build_dataloader(self.train_set, cfg.data.batch_size, cfg.data.num_workers,
                                             train=True, seed=cfg.seed, rank=rank, world_size=world)
        self.val_loader = build_dataloader(self.val_set, cfg.data.batch_size, cfg.data.num_workers,
                                           train=False, rank=rank, world_size=world)

        self.work_dir = Path(cfg.work_dir)
        self.iteration = 0
        self.data_position = (0, 0)  # (epoch, batches of it consumed): where the next batch comes from
        self.skipped_steps = self.consecutive_skips = self.skipped_samples = 0
        self.skipped_files: dict[str, int] = {}  # unreadable sample -> times dropped (data.skip_bad)
        self.history: list[dict] = []  # [{"iteration": i, "task/metric": value, ...}] per evaluation
        self.eval_skipped_files: list[str] = []  # validation samples the last evaluation could not read
        self.last_metrics: dict[str, float] = {}
        self.best = {"iteration": None, "score": -math.inf, "metrics": {}}
        self.stop_signal: Optional[int] = None  # set by SignalHook's handler
        self.stopped_by: Optional[str] = None  # the signal that ended the run early
        self.resumed_from: Optional[str] = None
        self.step_seconds = self.data_seconds = 0.0  # this run's time in steps / waiting for batches
        self.logger = self.writer = None  # rank 0's, set up by MetricWriterHook
        self._batches: Optional[Iterator[dict]] = None
        self._pending_skips: list[str] = []
        self.relations = None  # TaskRelations, when train.monitor_interval or train.affinity_interval is set
        relation_hooks = []
        if cfg.train.monitor_interval or cfg.train.affinity_interval:
            from ..relations import TaskRelations
            from ..relations.hook import TaskRelationHook

            self.relations = TaskRelations(self.tasks)
            relation_hooks = [TaskRelationHook()]
        # before the built-in hooks: a step's measurement is recorded before its checkpoint is written
        self.hooks = [*relation_hooks, *default_hooks(console, progress), *hooks]
        for hook in self.hooks:
            hook.trainer = self

    @property
    def epoch(self) -> int:
        return self.data_position[0]

    def _next_batch(self) -> dict:
        """The next training batch, one epoch (fresh permutation) after another, from ``data_position``;
        the unreadable samples it dropped (``data.skip_bad``) wait in ``_pending_skips``."""
        sampler = self.train_loader.sampler
        while True:
            epoch, done = self.data_position
            if done >= sampler.batches_per_epoch:
                self.balancer.end_epoch()
                self.data_position, self._batches = (epoch + 1, 0), None
                continue
            if self._batches is None:
                sampler.set_epoch(epoch, done)
                self._batches = iter(self.train_loader)
            batch = next(self._batches, None)
            if batch is None:  # the loader yielded fewer batches than the sampler promised
                self.data_position = (epoch, sampler.batches_per_epoch)
                continue
            self.batch_position = (epoch, done)  # after any epoch change: a retry reads this batch again
            self.data_position = (epoch, done + 1)
            self._pending_skips += batch.get("skipped_files", [])
            if "image" in batch:  # else nothing but unreadable samples (data.skip_bad): named, passed over
                return batch

    def _next_batches(self) -> list[dict]:
        """The ``balancer.batches_per_step`` batches of the next step (SDMGrad and MoDo draw 3); a
        failed step is retried from the first of them."""
        batches = [self._next_batch()]
        start = self.batch_position
        batches += [self._next_batch() for _ in range(self.balancer.batches_per_step - 1)]
        self.batch_position = start
        return batches

    def _to_device(self, batch: dict) -> dict:
        out = {}
        for task in self.task_specs:
            for key in task.target_keys:
                if key not in batch:
                    raise KeyError(f"the {task.name} task needs {key!r} in every batch; the dataset gives "
                                   f"{sorted(k for k in batch if k != 'meta')}")
                value = batch[key]  # box lists stay on the host: the loss pads them into one copy
                out[key] = value if isinstance(value, list) else value.to(self.device, non_blocking=True)
        out["image"] = batch["image"].to(self.device, non_blocking=True).contiguous(
            memory_format=self.memory_format)
        return out

    # ------------------------------------------------------------------------------------------------
    # The step

    def run_step(self, batch: dict | list[dict]) -> StepOutcome:
        """One optimisation step on ``batch`` (a list of ``balancer.batches_per_step`` batches when the
        method draws several: their losses ``[K,T]`` and forwards go to the balancer as a stack/list)."""
        if not self.model.training:  # train() walks every module: only after an evaluation put it in eval
            self.model.train()
        files, self._pending_skips = self._pending_skips, []
        datas = [self._to_device(b) for b in (batch if isinstance(batch, list) else [batch])]
        if len(datas) != self.balancer.batches_per_step:
            raise ValueError(f"run_step: {self.cfg.balancer.name!r} takes {self.balancer.batches_per_step} "
                             f"batches a step, got {len(datas)}")
        with self.autocast():
            forwards = [self.balancer.forward(self.forward_model, d["image"]) for d in datas]
        per_batch = [self.loss_fn.task_losses(f.outputs, d) for f, d in zip(forwards, datas)]
        losses, forward = (per_batch[0], forwards[0]) if len(datas) == 1 else (torch.stack(per_batch), forwards)
        local = [float(self.stop_signal is not None), float(len(files))]
        mean_losses, flags = losses.detach().float(), None
        if self.env.distributed:  # one collective: the same decisions (weights, skip, stop) on every process
            agreed = mean_over_processes(torch.cat([mean_losses.reshape(-1), losses.new_tensor(local)]))
            mean_losses, flags = agreed[:-2].view(losses.shape), agreed[-2:] * self.env.world_size
        clip = self.cfg.train.grad_clip
        penalty = getattr(self.model, "add_penalty_grad", None)  # a regulariser outside the task losses
        result = self.balancer.backward(losses, mean_losses, forward, flags, scaler=self.scaler,
                                        max_norm=clip if penalty is None else None)
        stop, dropped = result.extra if flags is not None else (self.stop_signal is not None, local[1])
        skip = result.skip
        if penalty is not None and not skip:  # its gradient is the same on every process: added after DDP's
            scale = float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0
            result.values["penalty"] = penalty(scale)
        if not skip and clip is not None and not result.clipped:
            self.scaler.unscale_(self.optimizer)
            norm = clip_grad_norm(self.trainable_params, clip)
            skip = not self.scaler.is_enabled() and not math.isfinite(float(norm))
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.balancer.after_update(mean_losses, lambda: self._losses_after_update(datas[0]))
        with warnings.catch_warnings():  # the schedule follows iterations, taken or skipped: torch warns
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()
        self.iteration += 1
        if self.env.distributed and dropped > 0:  # every process's dropped samples, named everywhere
            files = [f for names in all_gather_objects(files) for f in names]
        return StepOutcome(result.values, skip, stop > 0, files, result.grad_norm, result.gram)

    def after_step(self, outcome: StepOutcome) -> StepOutcome:
        """Every hook's ``after_step`` (counting, logging, evaluation, checkpoints) for a step taken."""
        for hook in self.hooks:
            hook.after_step(outcome)
        return outcome

    def iterate(self, batch: dict) -> StepOutcome:
        """One iteration on ``batch`` outside :meth:`train`: the step, then the hooks."""
        return self.after_step(self.run_step(batch))

    def _losses_after_update(self, data: dict) -> Tensor:
        with torch.no_grad(), self.autocast():
            return mean_over_processes(self.loss_fn.task_losses(self.model(data["image"]), data).float())

    def evaluate(self) -> dict[str, float]:
        """Flat validation metrics (``engine.evaluator``); unreadable samples in ``eval_skipped_files``."""
        self.eval_skipped_files = []
        return evaluate_model(self.model, self.val_loader, self.tasks, self.cfg.data.num_classes,
                              self.cfg.loss.ignore_index, self.device, self.autocast,
                              getattr(self.val_set, "classes", None),
                              skipped=self.eval_skipped_files if self.cfg.data.skip_bad else None)

    # ------------------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self, metrics: Optional[dict] = None, full: bool = True, gather: bool = True) -> dict:
        """The training state as a checkpoint (``checkpoint.training_state``); collective with ``gather``."""
        return training_state(self, metrics, full=full, gather=gather)

    def save(self, name: str, metrics: Optional[dict] = None, full: bool = True,
             gather: bool = True) -> Optional[Path]:
        """Write ``work_dir/checkpoints/<name>.pth`` atomically (rank 0 writes; with ``gather`` every
        process must call it)."""
        state = self.state_dict(metrics, full=full, gather=gather)
        if not self.is_main:
            return None
        return save_checkpoint(state, self.work_dir / "checkpoints" / f"{name}.pth")

    def resume(self, path) -> None:
        """Continue from checkpoint ``path`` exactly where it stopped (``engine.checkpoint``)."""
        restore_training_state(self, path)
        self._batches = None

    # ------------------------------------------------------------------------------------------------
    # The loop

    def train(self) -> dict[str, float]:
        """Run the schedule (from the resumed iteration, if any); returns the last validation metrics."""
        for hook in self.hooks:
            hook.before_train()
        try:
            while self.iteration < self.cfg.train.max_iters and self.stopped_by is None:
                t0 = time.perf_counter()
                batch = self._next_batches()
                t1 = time.perf_counter()
                try:
                    for hook in self.hooks:
                        hook.before_step(batch)
                    outcome = self.run_step(batch)
                except BaseException:
                    self.data_position, self._batches = self.batch_position, None  # a resume retries it
                    raise
                self.data_seconds += t1 - t0
                self.step_seconds += time.perf_counter() - t1
                self.after_step(outcome)
        except BaseException as exc:
            for hook in self.hooks:
                hook.on_exception(exc)
            raise
        finally:
            self._batches = None
            release_workers(self.train_loader)  # they ignore SIGTERM: ended through their queues
            for hook in reversed(self.hooks):
                hook.after_train()
        return self.last_metrics
