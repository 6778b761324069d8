"""The training loop: one ``Trainer`` per experiment config."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor
from tqdm import tqdm

from ..config import Config, config_to_dict, save_config
from ..data.builders import build_dataset
from ..balancing import LossWeighting
from ..losses import DenseMultiTaskLoss
from ..models import build_model
from .builders import (
    build_dataloader,
    build_optimizer,
    build_scheduler,
    build_task_balancer,
    check_amp,
    check_tasks,
    resolve_device,
    seed_everything,
)
from .checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from .evaluator import evaluate_model, primary_score, scalar_metrics
from .logging import ScalarWriter, setup_logger

__all__ = ["Trainer", "autocast_context", "write_json"]


def autocast_context(amp: str, device: torch.device):
    """A zero-argument factory of the autocast context for ``train.amp`` (``none``: no autocast)."""
    if amp == "none":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


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


class Trainer:
    """Trains ``build_model(cfg.model)`` on ``cfg.data`` with the static-weight dense loss.

    ``Trainer(cfg).train()`` runs ``cfg.train.max_iters`` iterations (one batch each, looping over epochs)
    and returns the final validation metrics (flat ``"task/metric"`` dict). It writes into ``cfg.work_dir``:
    ``config.yaml`` (at start), ``train.log``, TensorBoard events under ``tb/``,
    ``checkpoints/last.pth`` (every ``checkpoint_interval`` iterations and at the end),
    ``checkpoints/best.pth`` (the evaluation with the highest ``primary_score``: mean over tasks of
    ±log of seg mIoU / depth abs_err / normal mean angle) and ``metrics.json`` (at the end).

    Repeatable: the same config and seed give the same losses (model init, data order and worker seeds
    all derive from ``cfg.seed``; bit-exact on CPU, up to non-deterministic kernels on GPU). A step whose
    loss or gradient norm is not finite is skipped (no update; counted in ``skipped_steps`` and logged).

    Args:
        cfg: the experiment.
        console: echo log lines to stderr.
        progress: show a tqdm bar; ``None`` shows it only when stderr is a terminal.
    """

    def __init__(self, cfg: Config, *, console: bool = True, progress: Optional[bool] = None):
        self.cfg = cfg
        self.tasks = check_tasks(cfg)
        self.device = resolve_device(cfg.train.device)
        self.amp = check_amp(cfg.train.amp, self.device)
        self.autocast = autocast_context(self.amp, self.device)
        self.console, self.progress = console, progress
        # Single process for now: a distributed run will set this False on ranks > 0.
        self.is_main = True

        seed_everything(cfg.seed)
        self.model = build_model(config_to_dict(cfg.model)).to(self.device)
        self.loss_fn = DenseMultiTaskLoss(self.tasks, None, cfg.loss.ignore_index).to(self.device)
        # A LossWeighting module (ew, uw, dwa, ...) or a GradientBalancer (pcgrad, mgda, ...).
        self.balancer = build_task_balancer(cfg, self.model, self.tasks)
        self.grad_balancer = None if isinstance(self.balancer, LossWeighting) else self.balancer
        self.loss_weighting = self.balancer if self.grad_balancer is None else None
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        if self.loss_weighting is not None:
            self.loss_weighting.to(self.device)
            learned = [p for p in self.loss_weighting.parameters() if p.requires_grad]
            if learned:  # UW's log-variances train with the model, without weight decay
                self.optimizer.add_param_group({"params": learned, "weight_decay": 0.0})
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.train.max_iters)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")

        self.train_set = build_dataset(cfg.data, "train", cfg.seed)
        self.val_set = build_dataset(cfg.data, "val", cfg.seed)
        self.train_loader = build_dataloader(self.train_set, cfg.data.batch_size, cfg.data.num_workers,
                                             train=True, seed=cfg.seed)
        self.val_loader = build_dataloader(self.val_set, cfg.data.batch_size, cfg.data.num_workers,
                                           train=False)

        self.work_dir = Path(cfg.work_dir)
        self.iteration = 0
        self.epoch = 0
        self.skipped_steps = 0
        self.history: list[dict] = []  # [{"iteration": i, "task/metric": value, ...}] per evaluation
        self.last_metrics: dict[str, float] = {}
        self.best = {"iteration": None, "score": -math.inf, "metrics": {}}
        self._last_log_iter = 0
        self.step_seconds = 0.0  # time in train_step (forward, backward, update) this run
        self.data_seconds = 0.0  # time waiting for training batches this run
        self.logger = None
        self.writer: Optional[ScalarWriter] = None

    # ------------------------------------------------------------------------------------------------
    # Steps

    def _batches(self) -> Iterator[dict]:
        """Training batches forever, one epoch (fresh permutation) after another."""
        while True:
            for batch in self.train_loader:
                yield batch
            self.epoch += 1
            if self.loss_weighting is not None:
                self.loss_weighting.end_epoch()

    def _to_device(self, batch: dict) -> dict[str, Tensor]:
        keys = ("image", *self.tasks)
        return {k: batch[k].to(self.device, non_blocking=True) for k in keys}

    def _forward(self, images: Tensor):
        """Model outputs, and for representation-level gradient methods the shared features and the
        detached copies the heads ran on."""
        if self.grad_balancer is not None and self.grad_balancer.level == "rep":
            features = self.model.forward_features(images)
            head_inputs = [f.detach().requires_grad_() for f in features]
            return self.model.forward_heads(head_inputs, images.shape[-2:]), features, head_inputs
        return self.model(images), None, None

    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimisation step on ``batch``; returns ``{task: loss, "total": loss, "weight/<task>": w,
        "skipped": 0|1}`` (losses as floats, before the update; ``total`` is the weighted objective of a
        loss-weighting method, the plain sum of task losses for a gradient method)."""
        self.model.train()
        batch = self._to_device(batch)
        images = batch["image"]
        with self.autocast():
            outputs, features, head_inputs = self._forward(images)
        task_losses = self.loss_fn.task_losses(outputs, batch)
        if self.loss_weighting is not None:
            weights = self.loss_weighting.weights(task_losses.detach())
            total = (weights * task_losses).sum()
            extra = self.loss_weighting.extra_loss(task_losses)
            if extra is not None:
                total = total + extra
        else:
            weights, total = None, task_losses.sum()
        logged = {t: task_losses[i] for i, t in enumerate(self.tasks)}
        logged["total"] = total
        if weights is not None:  # a loss weighting's weights are known now: read them in the same sync
            logged.update({f"weight/{t}": weights[i].to(total.dtype) for i, t in enumerate(self.tasks)})
        values = dict(zip(logged, torch.stack(list(logged.values())).detach().float().tolist()))  # one sync
        self.optimizer.zero_grad(set_to_none=True)
        skipped = not math.isfinite(values["total"])
        if not skipped:
            if self.grad_balancer is None:
                if self.loss_weighting.requires_shared_parameters:  # GradNorm: the last shared layer
                    self.loss_weighting.pre_backward(task_losses, list(self.model.neck.parameters()))
                self.scaler.scale(total).backward()
            else:
                inv_scale = 1.0 / self.scaler.get_scale() if self.scaler.is_enabled() else None
                weights = self.grad_balancer.backward(self.scaler.scale(task_losses),
                                                      [outputs[t] for t in self.tasks], features, head_inputs,
                                                      inv_scale)
                # with fp16 the scaler finds non-finite gradients itself (and lowers its scale)
                skipped = not self.scaler.is_enabled() and not bool(torch.isfinite(self.grad_balancer.last_gram).all())
            if not skipped and self.cfg.train.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
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
                            new_losses = self.loss_fn.task_losses(self.model(images), batch)
                    self.loss_weighting.update(task_losses.detach(), new_losses)
        if self.grad_balancer is not None and weights is not None:  # solved on the host: no extra sync
            values.update({f"weight/{t}": w for t, w in zip(self.tasks, weights.detach().float().tolist())})
        if skipped:
            self.skipped_steps += 1
            if self.logger is not None:
                self.logger.warning(
                    "iter %d: non-finite loss or gradient (%s); step skipped (%d so far)", self.iteration + 1,
                    ", ".join(f"{k} {v:.4g}" for k, v in values.items()), self.skipped_steps)
        with warnings.catch_warnings():
            # The schedule follows iterations, taken or skipped; a skipped first step makes torch warn
            # that the scheduler stepped before the optimizer, which is intended here.
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()
        self.iteration += 1
        values["skipped"] = int(skipped)
        return values

    def evaluate(self) -> dict[str, float]:
        """Flat validation metrics of the current model (see ``mtvision.engine.evaluator.evaluate``)."""
        return evaluate_model(self.model, self.val_loader, self.tasks, self.cfg.data.num_classes,
                              self.cfg.loss.ignore_index, self.device, self.autocast,
                              getattr(self.val_set, "classes", None))

    # ------------------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self, metrics: Optional[dict] = None) -> dict:
        """Plain-data training state (loads with ``weights_only=True``)."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "metrics": scalar_metrics(metrics if metrics is not None else self.last_metrics),
            "best_score": self.best["score"] if math.isfinite(self.best["score"]) else None,
            "config": config_to_dict(self.cfg),
        }
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        if self.loss_weighting is not None:
            state["balancer"] = self.loss_weighting.state_dict()
        return state

    def save(self, name: str, metrics: Optional[dict] = None) -> Optional[Path]:
        """Write ``work_dir/checkpoints/<name>.pth`` atomically (main process only)."""
        if not self.is_main:
            return None
        return save_checkpoint(self.state_dict(metrics), self.work_dir / "checkpoints" / f"{name}.pth")

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

    def train(self) -> dict[str, float]:
        """Run the whole schedule; returns the final validation metrics."""
        cfg = self.cfg.train
        self._setup_outputs()
        sums: dict[str, float] = defaultdict(float)
        count = 0
        t_start = t_log = time.perf_counter()
        data_time = 0.0
        bar = tqdm(total=cfg.max_iters, initial=self.iteration, desc="train", dynamic_ncols=True,
                   disable=None if self.progress is None else not self.progress, leave=False)
        batches = self._batches()
        try:
            while self.iteration < cfg.max_iters:
                t0 = time.perf_counter()
                batch = next(batches)
                t1 = time.perf_counter()
                data_time += t1 - t0
                self.data_seconds += t1 - t0
                values = self.train_step(batch)
                self.step_seconds += time.perf_counter() - t1
                if not values["skipped"]:
                    for k, v in values.items():
                        if k != "skipped":
                            sums[k] += v
                    count += 1
                bar.update(1)
                bar.set_postfix(loss=f"{values['total']:.3f}", refresh=False)
                it = self.iteration
                if it % cfg.log_interval == 0 or it == cfg.max_iters:
                    self._log_train(sums, count, t_log, data_time)
                    sums.clear()
                    count, data_time, t_log = 0, 0.0, time.perf_counter()
                if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                    self._run_eval()
                if it % cfg.checkpoint_interval == 0 or it == cfg.max_iters:
                    self.save("last")
        except KeyboardInterrupt:
            if self.is_main and self.logger is not None:
                self.logger.warning("interrupted at iteration %d; saving checkpoints/last.pth",
                                    self.iteration)
                self.save("last")
            raise
        finally:
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
        self.writer.add_scalars("train", {"lr": lr, "skipped_steps": self.skipped_steps, "ms_per_iter": ms,
                                          "data_ms_per_iter": data_ms}, self.iteration)
        losses = " ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "total" and "/" not in k)
        weights = " ".join(f"{k[7:]} {v:.3f}" for k, v in means.items() if k.startswith("weight/"))
        if weights:
            losses += f"; weights {weights}"
        self.logger.info("iter %d/%d  epoch %d  lr %.3g  loss %.4f (%s)  %.0f ms/it (data %.0f)  skipped %d",
                         self.iteration, self.cfg.train.max_iters, self.epoch, lr,
                         means.get("total", math.nan), losses, ms, data_ms, self.skipped_steps)

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
            "train_seconds": train_seconds,
            "step_ms_per_iter": self.step_seconds / max(self.iteration, 1) * 1e3,
            "data_wait_ms_per_iter": self.data_seconds / max(self.iteration, 1) * 1e3,
        }
        write_json(summary, self.work_dir / "metrics.json")
        self.logger.info("done: %d iterations in %.1fs (step %.0f ms/it, data wait %.0f ms/it), %d skipped; "
                         "best @ %s (score %.4f); outputs in %s", self.iteration, train_seconds,
                         summary["step_ms_per_iter"], summary["data_wait_ms_per_iter"], self.skipped_steps,
                         self.best["iteration"], self.best["score"], self.work_dir)
