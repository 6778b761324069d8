"""The training loop: one ``Trainer`` per experiment config."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import threading
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..config import Config, config_to_dict, save_config
from ..data.builders import build_dataset
from ..balancing import LossWeighting
from ..losses import DETECTION_TASK, TARGET_KEYS, FCOSLoss, MultiTaskLoss
from ..models import build_model
from .builders import (
    build_dataloader,
    build_optimizer,
    build_scheduler,
    build_task_balancer,
    check_amp,
    check_tasks,
    check_train_switches,
    resolve_device,
    seed_everything,
)
from .checkpoint import (CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, rng_state, save_checkpoint,
                         set_rng_state)
from .distributed import all_gather_objects, broadcast_parameters, init_distributed
from .evaluator import evaluate_model, primary_score, scalar_metrics
from .logging import ScalarWriter, setup_logger

__all__ = ["Trainer", "TrainingError", "autocast_context", "write_json"]


def autocast_context(amp: str, device: torch.device):
    """A zero-argument factory of the autocast context for ``train.amp`` (``none``: no autocast)."""
    if amp == "none":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def clip_grad_norm(parameters, max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (L2 norm, the same arithmetic, bit-identical) in four operator
    calls when every gradient has one device and dtype; torch's makes one more call per parameter to
    gather the norms, host work that a launch-bound GPU step waits for. Returns the total norm (a
    tensor, not read back)."""
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return torch.zeros(())
    if len({(g.device, g.dtype) for g in grads}) > 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


def write_json(obj, path) -> None:
    """Write ``obj`` as indented JSON atomically (temporary file + rename); NaN/inf become null."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(clean(obj), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); the message says why and what to try."""


class Trainer:
    """Trains ``build_model(cfg.model)`` on ``cfg.data`` with the method of ``cfg.balancer``.

    ``Trainer(cfg).train()`` runs ``cfg.train.max_iters`` iterations (one global batch each, looping over
    epochs) and returns the final validation metrics (flat ``"task/metric"`` dict). It writes into
    ``cfg.work_dir``: ``config.yaml`` (at start), ``train.log``, TensorBoard events under ``tb/``,
    ``checkpoints/last.pth`` (every ``checkpoint_interval`` iterations, at the end and when stopped by a
    signal), ``checkpoints/best.pth`` (the evaluation with the highest ``primary_score``: mean over tasks of
    ±log of seg mIoU / depth abs_err / normal mean angle) and ``metrics.json`` (at the end).

    Distributed: under ``torchrun`` (``WORLD_SIZE > 1``) every process builds the same Trainer; the
    process group is started here (NCCL on GPUs, gloo on CPU), ``data.batch_size`` is the global batch
    split evenly over the processes, loss-weighting methods train through DDP and gradient methods reduce
    their per-task gradients themselves (one collective, ``GradientBalancer``); logged losses are
    averaged over processes, metrics are pooled over the whole validation set, and only rank 0 writes
    files. The weights after K steps equal those of one process on the same global batches (up to float
    summation order) when the model has no batch-dependent layer (BatchNorm in training mode; use
    ``train.sync_bn`` on GPUs).

    Repeatable and resumable: model init, data order and each sample's augmentation derive from
    ``cfg.seed`` (the same seed on every process, so random loss weights agree); ``resume(path)`` restores
    model, optimizer, scheduler, scaler, balancer, RNG states (per rank), data position and counters, so
    on CPU N steps straight equal N/2 steps, a resume and N/2 more, bit for bit. SIGTERM / SIGINT finish
    the current step, save ``last.pth`` and return (``stopped_by`` names the signal). A step whose loss or
    gradient is not finite is skipped (no update; counted in ``skipped_steps`` and logged); after
    ``train.max_consecutive_skips`` in a row a :class:`TrainingError` stops the run.

    Args:
        cfg: the experiment.
        console: echo log lines to stderr.
        progress: show a tqdm bar; ``None`` shows it only when stderr is a terminal.
    """

    def __init__(self, cfg: Config, *, console: bool = True, progress: Optional[bool] = None):
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
        self.console, self.progress = console, progress
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)

        seed_everything(cfg.seed)
        model = build_model(config_to_dict(cfg.model))
        if cfg.train.sync_bn and self.env.distributed:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device)
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model  # the plain module: its state_dict, parameters and submodules
        detection = None
        if DETECTION_TASK in self.tasks:
            head = self.model.heads[DETECTION_TASK]
            detection = FCOSLoss(head.num_classes, head.strides)
        self.loss_fn = MultiTaskLoss(self.tasks, cfg.loss.ignore_index, detection).to(self.device)
        # A LossWeighting module (ew, uw, dwa, ...) or a GradientBalancer (pcgrad, mgda, ...).
        self.balancer = build_task_balancer(cfg, self.model, self.tasks)
        self.grad_balancer = None if isinstance(self.balancer, LossWeighting) else self.balancer
        self.loss_weighting = self.balancer if self.grad_balancer is None else None
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.weighting_params: list[torch.nn.Parameter] = []
        if self.loss_weighting is not None:
            self.loss_weighting.to(self.device)
            self.weighting_params = [p for p in self.loss_weighting.parameters() if p.requires_grad]
            if self.weighting_params:  # UW's log-variances train with the model, without weight decay
                self.optimizer.add_param_group({"params": self.weighting_params, "weight_decay": 0.0})
        # listed once: walking the module tree for them every step is host work a fast GPU waits for
        self.trainable_params = [p for p in self.model.parameters() if p.requires_grad]
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.train.max_iters)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        if cfg.train.compile:
            if self.grad_balancer is not None or self.loss_weighting.requires_shared_parameters:
                # several backward passes through one graph (retain_graph): compiled backward functions
                # must not donate (free and reuse) their saved buffers after the first one
                import torch._functorch.config as functorch_config

                functorch_config.donated_buffer = False
            # in place, per submodule: the state_dict keys stay, and forward_features / forward_heads
            # (representation-level balancing) run compiled too
            for part in (self.model.backbone, self.model.neck, *self.model.heads.values()):
                if part is not None:
                    part.compile()
        # What the training forward calls: DDP for loss weighting (its reducer averages the gradient);
        # gradient methods average their per-task gradients themselves, so the plain module is used and
        # only its initial weights are copied from rank 0.
        self.forward_model = self.model
        if self.env.distributed:
            if self.grad_balancer is None:
                ids = [self.device.index] if self.device.type == "cuda" else None
                self.forward_model = DistributedDataParallel(self.model, device_ids=ids)
            else:
                broadcast_parameters(self.model)

        self.train_set = build_dataset(cfg.data, "train", cfg.seed)
        self.val_set = build_dataset(cfg.data, "val", cfg.seed)
        world, rank = self.env.world_size, self.env.rank
        self.train_loader = build_dataloader(self.train_set, cfg.data.batch_size, cfg.data.num_workers,
                                             train=True, seed=cfg.seed, rank=rank, world_size=world)
        self.val_loader = build_dataloader(self.val_set, cfg.data.batch_size, cfg.data.num_workers,
                                           train=False, rank=rank, world_size=world)

        self.work_dir = Path(cfg.work_dir)
        self.iteration = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # batches of the current epoch already consumed (the data position)
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.skipped_samples = 0  # unreadable samples dropped with data.skip_bad (all processes)
        self.history: list[dict] = []  # [{"iteration": i, "task/metric": value, ...}] per evaluation
        self.last_metrics: dict[str, float] = {}
        self.best = {"iteration": None, "score": -math.inf, "metrics": {}}
        self.stopped_by: Optional[str] = None  # the signal that ended the run early
        self.resumed_from: Optional[str] = None
        self._stop_signal: Optional[int] = None
        self._batch_iter: Optional[Iterator[dict]] = None
        self._pending_skipped_samples = 0
        self._last_log_iter = 0
        self.step_seconds = 0.0  # time in train_step (forward, backward, update) this run
        self.data_seconds = 0.0  # time waiting for training batches this run
        self.logger = None
        self.writer: Optional[ScalarWriter] = None

    # ------------------------------------------------------------------------------------------------
    # Steps

    def _end_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0
        self._batch_iter = None
        if self.loss_weighting is not None:
            self.loss_weighting.end_epoch()

    def _next_batch(self) -> dict:
        """The next training batch, one epoch (fresh permutation) after another, from the saved data
        position after a resume. A batch of nothing but unreadable samples (``data.skip_bad``) is
        counted and passed over."""
        sampler = self.train_loader.sampler
        while True:
            if self.batch_in_epoch >= sampler.batches_per_epoch:
                self._end_epoch()
            if self._batch_iter is None:
                sampler.set_epoch(self.epoch, self.batch_in_epoch)
                self._batch_iter = iter(self.train_loader)
            try:
                batch = next(self._batch_iter)
            except StopIteration:  # only when the loader yields fewer batches than the sampler promised
                self._end_epoch()
                continue
            self.batch_in_epoch += 1
            if "image" in batch:
                return batch
            self._pending_skipped_samples += batch["num_skipped"]

    def _to_device(self, batch: dict) -> dict[str, Tensor]:
        out = {}
        for t in self.tasks:
            for key in TARGET_KEYS[t]:
                if key not in batch:
                    raise KeyError(f"the {t} task needs {key!r} in every batch; the dataset gives "
                                   f"{sorted(k for k in batch if k != 'meta')}")
                # box lists stay where the loader put them: the loss checks them there and pads them
                # into one copy to the device
                value = batch[key]
                out[key] = value if isinstance(value, list) else value.to(self.device, non_blocking=True)
        out["image"] = batch["image"].to(self.device, non_blocking=True).contiguous(
            memory_format=self.memory_format)
        return out

    def _forward(self, images: Tensor):
        """Model outputs, and for representation-level gradient methods the shared features and the
        detached copies the heads ran on."""
        if self.grad_balancer is not None and self.grad_balancer.level == "rep":
            features = self.model.forward_features(images)
            head_inputs = [f.detach().requires_grad_() for f in features]
            return self.model.forward_heads(head_inputs, images.shape[-2:]), features, head_inputs
        return self.forward_model(images), None, None

    def _mean_over_processes(self, t: Tensor) -> Tensor:
        if self.env.distributed:
            t = t.clone()
            dist.all_reduce(t)
            t /= self.env.world_size
        return t

    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimisation step on ``batch``; returns ``{task: loss, "total": loss, "weight/<task>": w,
        "skipped": 0|1, "stop": 0|1}`` (losses as floats before the update, averaged
        over processes; ``total`` is the weighted objective of a loss-weighting method, the plain sum of
        task losses for a gradient method; ``stop``: a process received SIGTERM/SIGINT)."""
        if not self.model.training:  # train() walks every module: only after an evaluation put it in eval
            self.model.train()
        T = len(self.tasks)
        skipped_samples = batch.get("num_skipped", 0) + self._pending_skipped_samples
        self._pending_skipped_samples = 0
        batch = self._to_device(batch)
        images = batch["image"]
        with self.autocast():
            outputs, features, head_inputs = self._forward(images)
        task_losses = self.loss_fn.task_losses(outputs, batch)
        # One collective per step: the losses averaged over processes (so every process takes the same
        # decisions: weights, skip), whether any process was asked to stop, and the unreadable samples.
        if self.env.distributed:
            flags = task_losses.new_tensor([float(self._stop_signal is not None) * self.env.world_size,
                                            float(skipped_samples) * self.env.world_size], dtype=torch.float32)
            shared = self._mean_over_processes(torch.cat([task_losses.detach().float(), flags]))
            mean_losses, stop_and_skipped = shared[:T], {"stop": shared[T], "skipped_samples": shared[T + 1]}
        else:  # nothing to agree on: no collective, no extra host-to-device copy
            mean_losses, stop_and_skipped = task_losses.detach().float(), {}
        if self.loss_weighting is not None:
            weights = self.loss_weighting.weights(mean_losses)
            total = (weights * task_losses).sum()
            extra = self.loss_weighting.extra_loss(task_losses)
            if extra is not None:
                total = total + extra
            shown_total = (weights.detach() * mean_losses).sum() + (0.0 if extra is None else extra.detach())
        else:
            weights, total = None, task_losses.sum()
            shown_total = mean_losses.sum()
        logged = {t: mean_losses[i] for i, t in enumerate(self.tasks)}
        logged["total"] = shown_total
        if weights is not None:  # a loss weighting's weights are known now: read them in the same sync
            logged.update({f"weight/{t}": weights[i].detach() for i, t in enumerate(self.tasks)})
        logged.update(stop_and_skipped)
        stacked = torch.stack([v.float() for v in logged.values()])
        # a parameter-level gradient method assigns every .grad itself; the other backwards accumulate
        if self.grad_balancer is None or self.grad_balancer.level == "rep":
            self.optimizer.zero_grad(set_to_none=True)
        # A parameter-level gradient method clips inside its backward, folded into the task weights (no
        # pass over the gradients, no second wait for the device); with fp16 the scaler unscales first.
        clip_in_balancer = (self.grad_balancer is not None and self.grad_balancer.level == "param"
                            and self.cfg.train.grad_clip is not None and not self.scaler.is_enabled())
        if self.grad_balancer is None:
            values = dict(zip(logged, stacked.tolist()))  # waits for the forward
            skipped = not math.isfinite(values["total"])
            if not skipped:
                if self.loss_weighting.requires_shared_parameters:  # GradNorm: the last shared layer
                    self.loss_weighting.pre_backward(task_losses, list(self.model.last_shared_parameters()))
                self.scaler.scale(total).backward()
                if self.env.distributed and self.weighting_params:  # UW's log-variances: not in DDP
                    for p in self.weighting_params:
                        if p.grad is not None:
                            p.grad = self._mean_over_processes(p.grad)
        else:
            # The logged values come back with the Gramian (the step's one wait before the update); a
            # non-finite loss makes a non-finite Gramian, which is solved for nothing and skipped.
            inv_scale = 1.0 / self.scaler.get_scale() if self.scaler.is_enabled() else None
            self.grad_balancer.backward(self.scaler.scale(task_losses), [outputs[t] for t in self.tasks],
                                        features, head_inputs, inv_scale, read_with_gram=stacked,
                                        max_norm=self.cfg.train.grad_clip if clip_in_balancer else None)
            values = dict(zip(logged, self.grad_balancer.last_read.tolist()))
            # with fp16 the scaler finds non-finite gradients itself (and lowers its scale)
            skipped = not math.isfinite(values["total"]) or (
                not self.scaler.is_enabled() and not self.grad_balancer.last_gram_finite)
            if clip_in_balancer and self.grad_balancer.last_grad_norm is not None:
                skipped = skipped or not math.isfinite(self.grad_balancer.last_grad_norm)
        stop = values.pop("stop", 0.0) > 0 or (not self.env.distributed and self._stop_signal is not None)
        self.skipped_samples += int(round(values.pop("skipped_samples", skipped_samples)))
        if not skipped and self.cfg.train.grad_clip is not None and not clip_in_balancer:
            self.scaler.unscale_(self.optimizer)
            norm = clip_grad_norm(self.trainable_params, self.cfg.train.grad_clip)
            skipped = not self.scaler.is_enabled() and not math.isfinite(float(norm))
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.loss_weighting is not None:
                new_losses = None
                if self.loss_weighting.requires_new_losses:  # FAMO: the same batch after the step
                    with torch.no_grad(), self.autocast():
                        new_losses = self._mean_over_processes(
                            self.loss_fn.task_losses(self.model(images), batch).float())
                self.loss_weighting.update(mean_losses, new_losses)
        if self.grad_balancer is not None:  # solved on the host: no extra sync
            host_weights = self.grad_balancer.last_weights_host.tolist()
            values.update({f"weight/{t}": w for t, w in zip(self.tasks, host_weights)})
        if skipped:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self.logger is not None:
                self.logger.warning(
                    "iter %d: non-finite loss or gradient (%s); step skipped (%d so far, %d in a row)",
                    self.iteration + 1, ", ".join(f"{k} {v:.4g}" for k, v in values.items()),
                    self.skipped_steps, self.consecutive_skips)
        else:
            self.consecutive_skips = 0
        with warnings.catch_warnings():
            # The schedule follows iterations, taken or skipped; a skipped first step makes torch warn
            # that the scheduler stepped before the optimizer, which is intended here.
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()
        self.iteration += 1
        values["skipped"] = int(skipped)
        values["stop"] = int(stop)
        limit = self.cfg.train.max_consecutive_skips
        if self.consecutive_skips >= limit:
            raise TrainingError(
                f"{self.consecutive_skips} non-finite steps in a row at iteration {self.iteration} "
                f"(train.max_consecutive_skips = {limit}); last losses: "
                + ", ".join(f"{k} {v:.4g}" for k, v in values.items() if k not in ("skipped", "stop"))
                + ". Try a lower optimizer.lr, train.grad_clip, train.amp=none, or check the data.")
        return values

    def evaluate(self) -> dict[str, float]:
        """Flat validation metrics of the current model (see ``mtvision.engine.evaluator.evaluate``)."""
        return evaluate_model(self.model, self.val_loader, self.tasks, self.cfg.data.num_classes,
                              self.cfg.loss.ignore_index, self.device, self.autocast,
                              getattr(self.val_set, "classes", None))

    # ------------------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self, metrics: Optional[dict] = None) -> dict:
        """Plain-data training state (loads with ``weights_only=True``); collective under torch.distributed
        (every process contributes its RNG states), so every process must call it."""
        rng = all_gather_objects(rng_state())
        state = {
            "format": CHECKPOINT_FORMAT,
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "metrics": scalar_metrics(metrics if metrics is not None else self.last_metrics),
            "best_score": self.best["score"] if math.isfinite(self.best["score"]) else None,
            "config": config_to_dict(self.cfg),
            "rng": rng,  # per rank
            "data": {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                     "world_size": self.env.world_size},
            "counters": {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                         "skipped_samples": self.skipped_samples},
            "best": {"iteration": self.best["iteration"], "score": self.best["score"] if math.isfinite(self.best["score"]) else None,
                     "metrics": scalar_metrics(self.best["metrics"])},
            "history": [scalar_metrics(h) for h in self.history],
        }
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        if self.loss_weighting is not None:
            state["balancer"] = self.loss_weighting.state_dict()
        elif self.grad_balancer.generator is not None:
            state["balancer"] = {"generator": self.grad_balancer.generator.get_state()}
        return state

    def save(self, name: str, metrics: Optional[dict] = None) -> Optional[Path]:
        """Write ``work_dir/checkpoints/<name>.pth`` atomically (rank 0 writes; every process calls it)."""
        state = self.state_dict(metrics)
        if not self.is_main:
            return None
        return save_checkpoint(state, self.work_dir / "checkpoints" / f"{name}.pth")

    def _load_optimizer_state(self, saved: dict) -> None:
        """The optimizer's state and hyperparameters from a checkpoint, keeping this run's choice of
        implementation (``optimizer.fused``): torch would take the checkpoint's, so a checkpoint of a
        run without the fused update would resume without it. The step counters go where the
        implementation keeps them (on the parameters' device for the fused update, else on the host)."""
        keys = ("fused", "foreach", "capturable")
        chosen = [{k: g[k] for k in keys if k in g} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(saved)
        for group, how in zip(self.optimizer.param_groups, chosen):
            group.update(how)
            on_device = bool(group.get("fused") or group.get("capturable"))
            for p in group["params"]:
                step = self.optimizer.state.get(p, {}).get("step")
                if torch.is_tensor(step):
                    self.optimizer.state[p]["step"] = step.to(device=p.device if on_device else "cpu",
                                                              dtype=torch.float32)

    def resume(self, path) -> None:
        """Continue from checkpoint ``path`` exactly where it stopped (see the class docstring).

        CheckpointError naming the file when it is not a resumable checkpoint of this experiment (another
        model config, tasks or balancer)."""
        path = Path(path)
        state = load_checkpoint(path, map_location=self.device)
        missing = [k for k in ("optimizer", "scheduler", "rng", "data") if k not in state]
        if missing:
            raise CheckpointError(f"{path} cannot be resumed from: no {', '.join(missing)} (a checkpoint of "
                                  f"an older mtvision or a weights-only file; use model.backbone.pretrained)")
        saved = state.get("config", {})
        for key in ("model", "balancer"):
            if saved.get(key) != config_to_dict(getattr(self.cfg, key)):
                raise CheckpointError(f"{path} was trained with another {key} config than {self.cfg.work_dir}'s; "
                                      f"resume with the config it was written with")
        if saved.get("data", {}).get("tasks") != list(self.tasks):
            raise CheckpointError(f"{path} was trained on tasks {saved.get('data', {}).get('tasks')}, "
                                  f"this config has {self.tasks}")
        self.model.load_state_dict(state["model"])
        self._load_optimizer_state(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        if "balancer" in state:
            if self.loss_weighting is not None:
                self.loss_weighting.load_state_dict(state["balancer"])
            elif self.grad_balancer.generator is not None and "generator" in state["balancer"]:
                self.grad_balancer.generator.set_state(state["balancer"]["generator"].cpu())
        self.iteration = int(state["iteration"])
        data = state["data"]
        self.epoch, self.batch_in_epoch = int(data["epoch"]), int(data["batch_in_epoch"])
        self._batch_iter = None
        counters = state.get("counters", {})
        self.skipped_steps = int(counters.get("skipped_steps", 0))
        self.consecutive_skips = int(counters.get("consecutive_skips", 0))
        self.skipped_samples = int(counters.get("skipped_samples", 0))
        best = state.get("best") or {}
        score = best.get("score")
        self.best = {"iteration": best.get("iteration"), "score": -math.inf if score is None else float(score),
                     "metrics": dict(best.get("metrics", {}))}
        self.history = [dict(h) for h in state.get("history", [])]
        self.last_metrics = dict(state.get("metrics", {}))
        self._last_log_iter = self.iteration
        rng = state["rng"]
        same_split = int(data.get("world_size", 1)) == self.env.world_size and len(rng) == self.env.world_size
        if not same_split:
            warnings.warn(f"{path} was written by {data.get('world_size')} processes, this run has "
                          f"{self.env.world_size}: the data order continues, random states restart from rank 0's",
                          stacklevel=2)
        set_rng_state(rng[self.env.rank] if same_split else rng[0])
        self.resumed_from = str(path)

    # ------------------------------------------------------------------------------------------------
    # Loop

    def _setup_outputs(self) -> None:
        if not self.is_main:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.work_dir / "config.yaml")
        self.logger = setup_logger(self.work_dir, console=self.console)
        self.writer = ScalarWriter(self.work_dir / "tb")
        n_params = sum(p.numel() for p in self.model.parameters())
        self.logger.info("work dir %s; device %s; amp %s; torch %s; %d threads", self.work_dir, self.device,
                         self.amp, torch.__version__, torch.get_num_threads())
        self.logger.info("model: %s backbone, tasks %s, %.2fM parameters; train %d / val %d samples, "
                         "batch %d",
                         self.cfg.model.backbone.get("name"), self.tasks, n_params / 1e6, len(self.train_set),
                         len(self.val_set), self.cfg.data.batch_size)
        if self.env.distributed:
            self.logger.info("distributed: %d processes (%s), %d samples per process and step",
                             self.env.world_size, dist.get_backend(), self.cfg.data.batch_size // self.env.world_size)
        if self.resumed_from:
            self.logger.info("resumed from %s at iteration %d (epoch %d, batch %d)", self.resumed_from,
                             self.iteration, self.epoch, self.batch_in_epoch)

    def _run_eval(self) -> dict[str, float]:
        t0 = time.perf_counter()
        metrics = self.evaluate()
        self.last_metrics = metrics
        self.history.append({"iteration": self.iteration, **metrics})
        score = primary_score(metrics, self.tasks)
        improved = score > self.best["score"]
        if improved:
            self.best = {"iteration": self.iteration, "score": score, "metrics": metrics}
        if self.is_main:
            shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.count("/") == 1)
            self.logger.info("eval @ %d (%.1fs): %s  score %.4f%s", self.iteration, time.perf_counter() - t0,
                             shown, score, "  (best)" if improved else "")
            self.writer.add_scalars("val", metrics, self.iteration)
            self.writer.add_scalars("val", {"score": score}, self.iteration)
        if improved:
            self.save("best", metrics)
        return metrics

    def _install_signal_handlers(self) -> dict:
        """SIGTERM / SIGINT ask the loop to stop after the current step (a second SIGINT interrupts at
        once). Only possible from the main thread; returns the previous handlers."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(signum, frame):
            if signum == signal.SIGINT and self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum

        return {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def train(self) -> dict[str, float]:
        """Run the schedule (from the resumed iteration, if any); returns the last validation metrics.

        Stops early after a SIGTERM / SIGINT (``stopped_by`` is set, ``last.pth`` saved) and raises
        :class:`TrainingError` after too many non-finite steps in a row."""
        cfg = self.cfg.train
        self._setup_outputs()
        sums: dict[str, float] = defaultdict(float)
        count = 0
        t_start = t_log = time.perf_counter()
        data_time = 0.0
        bar = tqdm(total=cfg.max_iters, initial=self.iteration, desc="train", dynamic_ncols=True,
                   disable=(None if self.progress is None else not self.progress) if self.is_main else True,
                   leave=False)
        previous_handlers = self._install_signal_handlers()
        try:
            while self.iteration < cfg.max_iters:
                t0 = time.perf_counter()
                batch = self._next_batch()
                t1 = time.perf_counter()
                data_time += t1 - t0
                self.data_seconds += t1 - t0
                values = self.train_step(batch)
                self.step_seconds += time.perf_counter() - t1
                if not values["skipped"]:
                    for k, v in values.items():
                        if k not in ("skipped", "stop"):
                            sums[k] += v
                    count += 1
                bar.update(1)
                bar.set_postfix(loss=f"{values['total']:.3f}", refresh=False)
                it = self.iteration
                if it % cfg.log_interval == 0 or it == cfg.max_iters:
                    self._log_train(sums, count, t_log, data_time)
                    sums.clear()
                    count, data_time, t_log = 0, 0.0, time.perf_counter()
                if values["stop"]:
                    self.stopped_by = signal.Signals(self._stop_signal).name if self._stop_signal else "peer"
                    self.save("last")
                    if self.is_main:
                        self.logger.warning("stopped by %s at iteration %d; saved checkpoints/last.pth (resume "
                                            "with --resume)", self.stopped_by, self.iteration)
                    return self.last_metrics
                if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                    self._run_eval()
                if it % cfg.checkpoint_interval == 0 or it == cfg.max_iters:
                    self.save("last")
        except KeyboardInterrupt:
            if not self.env.distributed and self.logger is not None:  # peers may be mid-collective
                self.logger.warning("interrupted at iteration %d; saving checkpoints/last.pth", self.iteration)
                self.save("last")
            raise
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            bar.close()
            if self.writer is not None:
                self.writer.close()
        train_seconds = time.perf_counter() - t_start
        self._finish(train_seconds)
        return self.last_metrics

    def _log_train(self, sums, count, t_log, data_time) -> None:
        if not self.is_main:
            return
        n = max(count, 1)
        means = {k: v / n for k, v in sums.items()}
        elapsed = time.perf_counter() - t_log
        steps = self.iteration - self._last_log_iter
        self._last_log_iter = self.iteration
        lr = self.optimizer.param_groups[-1]["lr"]
        self.writer.add_scalars("train", {k if k.startswith("weight/") else f"loss/{k}": v
                                          for k, v in means.items()}, self.iteration)
        ms, data_ms = elapsed / max(steps, 1) * 1e3, data_time / max(steps, 1) * 1e3
        self.writer.add_scalars("train", {"lr": lr, "skipped_steps": self.skipped_steps,
                                          "skipped_samples": self.skipped_samples, "ms_per_iter": ms,
                                          "data_ms_per_iter": data_ms}, self.iteration)
        losses = " ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "total" and "/" not in k)
        weights = " ".join(f"{k[7:]} {v:.3f}" for k, v in means.items() if k.startswith("weight/"))
        if weights:
            losses += f"; weights {weights}"
        bad_data = f", skipped samples {self.skipped_samples}" if self.skipped_samples else ""
        self.logger.info("iter %d/%d  epoch %d  lr %.3g  loss %.4f (%s)  %.0f ms/it (data %.0f)  skipped %d%s",
                         self.iteration, self.cfg.train.max_iters, self.epoch, lr,
                         means.get("total", math.nan), losses, ms, data_ms, self.skipped_steps, bad_data)

    def _finish(self, train_seconds: float) -> None:
        if not self.is_main:
            return
        summary = {
            "iteration": self.iteration,
            "tasks": self.tasks,
            "final": self.last_metrics,
            "best": self.best if math.isfinite(self.best["score"]) else {**self.best, "score": None},
            "history": self.history,
            "skipped_steps": self.skipped_steps,
            "skipped_samples": self.skipped_samples,
            "world_size": self.env.world_size,
            "train_seconds": train_seconds,
            "step_ms_per_iter": self.step_seconds / max(self.iteration, 1) * 1e3,
            "data_wait_ms_per_iter": self.data_seconds / max(self.iteration, 1) * 1e3,
        }
        write_json(summary, self.work_dir / "metrics.json")
        self.logger.info("done: %d iterations in %.1fs (step %.0f ms/it, data wait %.0f ms/it), %d skipped; "
                         "best @ %s (score %.4f); outputs in %s", self.iteration, train_seconds,
                         summary["step_ms_per_iter"], summary["data_wait_ms_per_iter"], self.skipped_steps,
                         self.best["iteration"], self.best["score"], self.work_dir)
