"""What the training loop does around its steps, one hook each: stop on a signal, the non-finite-step
policy, the log / TensorBoard / progress bar, evaluation with the best checkpoint, and the periodic,
final, stop and crash checkpoints.

The loop (:meth:`mtvision.engine.trainer.Trainer.train`) calls, for every hook in order,
``before_train()`` once, ``before_step(batch)`` and ``after_step(outcome)`` around every step,
``on_exception(exc)`` when the run fails, and ``after_train()`` at the end whatever happened. A hook
reads and writes the trainer it is
given (``hook.trainer``); pass your own with ``Trainer(cfg, hooks=[...])``.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from tqdm import tqdm

from ..distributed import broadcast_buffers
from .evaluator import primary_score
from .logging import ScalarWriter, log_traceback_to_file, setup_logger
from .utils import write_json

if TYPE_CHECKING:
    from .trainer import StepOutcome, Trainer

__all__ = ["HookBase", "SignalHook", "NonFiniteHook", "MetricWriterHook", "EvalHook", "CheckpointHook",
           "TrainingError", "default_hooks"]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); the message says why and what
    to try."""


class HookBase:
    """A hook of the training loop; every method does nothing unless overridden."""

    trainer: "Trainer"

    def before_train(self) -> None:
        pass

    def before_step(self, batch) -> None:
        """Before each step, with its batch (a list of batches for a method that draws several)."""

    def after_step(self, outcome: "StepOutcome") -> None:
        pass

    def on_exception(self, exc: BaseException) -> None:
        pass

    def after_train(self) -> None:
        pass


def _sync_buffers(t: "Trainer") -> None:
    """Rank 0's BatchNorm statistics on every process, once per iteration (evaluation and checkpoint
    often fall on the same one)."""
    if getattr(t, "_buffers_synced_at", None) != t.iteration:
        broadcast_buffers(t.model)
        t._buffers_synced_at = t.iteration


def _due(iteration: int, interval: int, last: int) -> bool:
    return iteration % interval == 0 or iteration == last


class SignalHook(HookBase):
    """SIGTERM / SIGINT ask the loop to stop after the current step (``trainer.stop_signal``; every process
    learns of it through the step's collective); a second SIGINT interrupts at once. Handlers are
    installed from the main thread only and restored after training."""

    def __init__(self):
        self._previous: dict = {}

    def before_train(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def request_stop(signum, frame):
            if signum == signal.SIGINT and self.trainer.stop_signal is not None:
                raise KeyboardInterrupt
            self.trainer.stop_signal = signum

        self._previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def after_step(self, outcome) -> None:
        if outcome.stop:
            sig = self.trainer.stop_signal
            self.trainer.stopped_by = signal.Signals(sig).name if sig else "peer"

    def after_train(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class NonFiniteHook(HookBase):
    """A step whose loss or gradient is not finite was skipped (no update): count it, log it, and after
    ``train.max_consecutive_skips`` in a row raise :class:`TrainingError`."""

    def after_step(self, outcome) -> None:
        t = self.trainer
        if not outcome.skipped:
            t.consecutive_skips = 0
            return
        t.skipped_steps += 1
        t.consecutive_skips += 1
        shown = ", ".join(f"{k} {v:.4g}" for k, v in outcome.values.items())
        if t.logger is not None:
            t.logger.warning("iter %d: non-finite loss or gradient (%s); step skipped "
                             "(%d so far, %d in a row)",
                             t.iteration, shown, t.skipped_steps, t.consecutive_skips)
        limit = t.cfg.train.max_consecutive_skips
        if t.consecutive_skips >= limit:
            raise TrainingError(
                f"{t.consecutive_skips} non-finite steps in a row at iteration {t.iteration} "
                f"(train.max_consecutive_skips = {limit}); last losses: {shown}. "
                "Try a lower optimizer.lr, train.grad_clip, train.amp=none, or check the data.")


class MetricWriterHook(HookBase):
    """The run's outputs on rank 0: the work dir with ``config.yaml``, ``train.log`` (also on the
    console), TensorBoard scalars under ``tb/``, the progress bar, the running means of the logged
    values every ``train.log_interval`` steps, and ``metrics.json`` when the schedule completes."""

    def __init__(self, console: bool = True, progress: Optional[bool] = None):
        self.console, self.progress = console, progress
        self.bar = None
        self._sums: dict[str, float] = defaultdict(float)
        self._count = 0
        self._t_log = self._t_start = 0.0
        self._last_log_iter = 0
        self._data_seconds = 0.0

    def before_train(self) -> None:
        t = self.trainer
        self._t_start = self._t_log = time.perf_counter()
        self._last_log_iter = t.iteration
        self._data_seconds = t.data_seconds
        if not t.is_main:
            return
        from ..config import save_config

        t.work_dir.mkdir(parents=True, exist_ok=True)
        save_config(t.cfg, t.work_dir / "config.yaml")
        t.logger = setup_logger(t.work_dir, console=self.console)
        t.writer = ScalarWriter(t.work_dir / "tb")
        log_setup(t)
        show = None if self.progress is None else self.progress
        self.bar = tqdm(total=t.cfg.train.max_iters, initial=t.iteration, desc="train", dynamic_ncols=True,
                        disable=None if show is None else not show, leave=False)

    def after_step(self, outcome) -> None:
        t = self.trainer
        if not outcome.skipped:
            for k, v in outcome.values.items():
                self._sums[k] += v
            self._count += 1
        for name in outcome.skipped_files:
            if name not in t.skipped_files and t.writer is not None:  # named once, counted every time
                t.logger.warning("skipped an unreadable sample (data.skip_bad): %s", name)
                t.writer.add_text("data/skipped", name, t.iteration)
            t.skipped_files[name] = t.skipped_files.get(name, 0) + 1
        t.skipped_samples += len(outcome.skipped_files)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{outcome.values.get('total', math.nan):.3f}", refresh=False)
        if t.writer is not None and _due(t.iteration, t.cfg.train.log_interval, t.cfg.train.max_iters):
            self._log()

    def _log(self) -> None:
        t = self.trainer
        means = {k: v / max(self._count, 1) for k, v in self._sums.items()}
        steps = max(t.iteration - self._last_log_iter, 1)
        ms = (time.perf_counter() - self._t_log) / steps * 1e3
        data_ms = (t.data_seconds - self._data_seconds) / steps * 1e3
        lr = t.optimizer.param_groups[-1]["lr"]
        t.writer.add_scalars("train", {k if k.startswith("weight/") else f"loss/{k}": v
                                       for k, v in means.items()}, t.iteration)
        t.writer.add_scalars("train", {"lr": lr, "skipped_steps": t.skipped_steps,
                                       "skipped_samples": t.skipped_samples, "ms_per_iter": ms,
                                       "data_ms_per_iter": data_ms}, t.iteration)
        losses = " ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "total" and "/" not in k)
        weights = " ".join(f"{k[7:]} {v:.3f}" for k, v in means.items() if k.startswith("weight/"))
        if weights:
            losses += f"; weights {weights}"
        bad = f", skipped samples {t.skipped_samples}" if t.skipped_samples else ""
        t.logger.info("iter %d/%d  epoch %d  lr %.3g  loss %.4f (%s)  %.0f ms/it (data %.0f)  "
                      "skipped steps %d%s", t.iteration, t.cfg.train.max_iters, t.epoch, lr,
                      means.get("total", math.nan), losses, ms, data_ms, t.skipped_steps, bad)
        self._sums.clear()
        self._count, self._t_log, self._last_log_iter = 0, time.perf_counter(), t.iteration
        self._data_seconds = t.data_seconds

    def after_train(self) -> None:
        t = self.trainer
        if self.bar is not None:
            self.bar.close()
        if t.is_main and t.iteration >= t.cfg.train.max_iters and t.stopped_by is None:
            seconds = time.perf_counter() - self._t_start
            summary = run_summary(t, seconds)
            write_json(summary, t.work_dir / "metrics.json")
            t.logger.info("done: %d iterations in %.1fs (step %.0f ms/it, data wait %.0f ms/it); "
                          "%d steps skipped (non-finite), %d samples skipped (unreadable); "
                          "best @ %s (score %.4f); outputs in %s",
                          t.iteration, seconds, summary["step_ms_per_iter"],
                          summary["data_wait_ms_per_iter"], t.skipped_steps, t.skipped_samples,
                          t.best["iteration"], t.best["score"], t.work_dir)
        if t.writer is not None:
            t.writer.close()


class EvalHook(HookBase):
    """Every ``train.eval_interval`` steps and at the end: the validation metrics (history,
    ``last_metrics``), and ``checkpoints/best.pth`` when the primary score (of the tasks not in
    ``train.auxiliary_tasks``) improves. BatchNorm running
    statistics are first made equal on every process (rank 0's), so what is evaluated is what is saved."""

    def after_step(self, outcome) -> None:
        t = self.trainer
        if t.stopped_by is not None or not _due(t.iteration, t.cfg.train.eval_interval,
                                                t.cfg.train.max_iters):
            return
        _sync_buffers(t)
        t0 = time.perf_counter()
        metrics = t.evaluate()
        t.last_metrics = metrics
        t.history.append({"iteration": t.iteration, **metrics})
        auxiliary = set(t.cfg.train.auxiliary_tasks)
        score = primary_score(metrics, [x for x in t.tasks if x not in auxiliary])
        improved = score > t.best["score"]
        if improved:
            t.best = {"iteration": t.iteration, "score": score, "metrics": metrics}
        if t.logger is not None:
            for name in t.eval_skipped_files:
                t.logger.warning("evaluation skipped an unreadable sample (data.skip_bad): %s", name)
            shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.count("/") == 1)
            aux = f" (without auxiliary {', '.join(sorted(auxiliary))})" if auxiliary else ""
            t.logger.info("eval @ %d (%.1fs): %s  score%s %.4f%s", t.iteration, time.perf_counter() - t0,
                          shown, aux, score, "  (best)" if improved else "")
            t.writer.add_scalars("val", {**metrics, "score": score}, t.iteration)
        if improved:
            t.save("best", metrics, full=t.cfg.train.full_best_checkpoint)


class CheckpointHook(HookBase):
    """``checkpoints/last.pth`` every ``train.checkpoint_interval`` steps, at the end, when stopped by a
    signal, and when the run fails after it started (the error is re-raised after the save)."""

    def __init__(self):
        self.complete_at: Optional[int] = None  # the iteration last.pth holds with every rank's state

    def before_train(self) -> None:
        t = self.trainer
        last = t.work_dir / "checkpoints" / "last.pth"
        resumed = t.resumed_from is not None and Path(t.resumed_from).resolve() == last.resolve()
        self.complete_at = t.iteration if resumed else None

    def _save_complete(self) -> None:
        _sync_buffers(self.trainer)
        self.trainer.save("last")
        self.complete_at = self.trainer.iteration

    def after_step(self, outcome) -> None:
        t = self.trainer
        if t.stopped_by is not None:
            self._save_complete()
            if t.logger is not None:
                t.logger.warning("stopped by %s at iteration %d; saved checkpoints/last.pth (resume with "
                                 "python tools/train.py %s --resume)", t.stopped_by, t.iteration,
                                 t.work_dir / "config.yaml")
        elif _due(t.iteration, t.cfg.train.checkpoint_interval, t.cfg.train.max_iters):
            self._save_complete()

    def on_exception(self, exc: BaseException) -> None:
        """Save what was trained before the error, without collectives (a peer may be gone or stuck):
        rank 0 writes, with its own random state, at the data position of the step that failed. When
        last.pth already holds this iteration with every process's random state (a peer died right after
        a checkpoint, say), it is kept: overwriting it would lose the other ranks' states and gain
        nothing."""
        t = self.trainer
        if not t.is_main or t.iteration == 0 or t.logger is None:
            return
        reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[-1]}"
        if self.complete_at == t.iteration:
            t.logger.error("run failed at iteration %d (%s); checkpoints/last.pth already holds this "
                           "iteration (resume with --resume)", t.iteration, reason)
            log_traceback_to_file(t.logger, exc)
            return
        try:
            path = t.save("last", gather=False)
            t.logger.error("run failed at iteration %d (%s); saved %s (resume with --resume)", t.iteration,
                           reason, path)
            log_traceback_to_file(t.logger, exc)
        except Exception as save_error:  # noqa: BLE001 - the original error is the one to report
            t.logger.error("run failed at iteration %d and last.pth could not be written: %s", t.iteration,
                           save_error)


def log_setup(self) -> None:
    """The run's first log lines (rank 0's ``self``, a trainer)."""
    n_params = sum(p.numel() for p in self.model.parameters())
    log = self.logger.info
    log("work dir %s; device %s; amp %s; torch %s; %d threads", self.work_dir, self.device, self.amp,
        torch.__version__, torch.get_num_threads())
    log("model: %s, %s backbone (pretrained: %s), tasks %s, %.2fM parameters; train %d / val %d samples, "
        "batch %d", (self.cfg.model.arch or {}).get("name", "hps"), self.cfg.model.backbone.get("name"),
        self.cfg.model.backbone.get("pretrained"), self.tasks, n_params / 1e6, len(self.train_set), len(self.val_set), self.cfg.data.batch_size)
    if self.env.distributed:
        log("distributed: %d processes (%s), %d samples per process and step", self.env.world_size,
            torch.distributed.get_backend(),
            self.cfg.data.batch_size // self.env.world_size)
    for split, problems in self.bad_samples.items():
        log("data.check: read all %s samples of the %s split; %d unreadable (skipped: data.skip_bad)%s",
            len(self.train_set if split == "train" else self.val_set), split, len(problems),
            "".join(f"\n  {p}" for p in problems))
    if self.resumed_from:
        log("resumed from %s at iteration %d (epoch %d, batch %d)", self.resumed_from, self.iteration,
            *self.data_position)

def run_summary(self, train_seconds: float) -> dict:
    """``metrics.json`` of trainer ``self``: final and best metrics, history, what was skipped, timings."""
    finite = math.isfinite(self.best["score"])
    return {
        "iteration": self.iteration, "tasks": self.tasks, "final": self.last_metrics,
        "best": self.best if finite else {**self.best, "score": None}, "history": self.history,
        "skipped_steps": self.skipped_steps, "skipped_samples": self.skipped_samples,
        "skipped_files": self.skipped_files, "eval_skipped_files": self.eval_skipped_files,
        "world_size": self.env.world_size, "auxiliary_tasks": list(self.cfg.train.auxiliary_tasks),
        **({"relations": self.relations.summary()} if self.relations is not None else {}),
        "train_seconds": train_seconds,
        "step_ms_per_iter": self.step_seconds / max(self.iteration, 1) * 1e3,
        "data_wait_ms_per_iter": self.data_seconds / max(self.iteration, 1) * 1e3,
    }


def default_hooks(console: bool = True, progress: Optional[bool] = None) -> list[HookBase]:
    """The loop's built-in hooks, in the order they run after a step."""
    return [SignalHook(), NonFiniteHook(), MetricWriterHook(console, progress), EvalHook(), CheckpointHook()]
