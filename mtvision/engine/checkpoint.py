"""Checkpoints: atomic writes, ``weights_only`` loads, loading a model's weights from one, and the whole
training state gathered from and restored into a trainer in one place.

A checkpoint is a dict of plain data only (tensors, dicts, lists, str, numbers, None), so
``torch.load(..., weights_only=True)`` reads it without unpickling arbitrary objects::

    {"format": 2, "iteration": int, "model": state_dict, "metrics": {"task/metric": float},
     "config": config_to_dict(cfg),
     # a resumable checkpoint (last.pth; best.pth with train.full_best_checkpoint) also has
     "optimizer": state_dict, "scheduler": state_dict, "scaler": state_dict | absent,
     "balancer": state | absent, "rng": [rng_state() of each rank],
     "data": {"epoch", "batch_in_epoch", "world_size"}, "counters": {...},
     "best": {"iteration", "score", "metrics"}, "history": [...],
     "relations": TaskRelations.state_dict() | absent (train.monitor_interval / affinity_interval)}

Format 1 (before resumable training) lacks the resumable part; it still loads for evaluation and inference.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "save_checkpoint", "load_checkpoint", "load_model_weights",
           "rng_state", "set_rng_state", "training_state", "restore_training_state"]

CHECKPOINT_FORMAT = 2

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message names the file."""


def save_checkpoint(state: dict[str, Any], path: PathLike) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, fsync, ``os.replace``,
    then fsync of the folder, so a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable; not every platform/filesystem allows opening a directory
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
    return path


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; FileNotFoundError / CheckpointError name the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the path; the cause is chained
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not an mtvision checkpoint (no 'model' entry)")
    return state


def load_model_weights(model: nn.Module, path: PathLike) -> dict[str, Any]:
    """Load the ``model`` entry of checkpoint ``path`` into ``model`` (strict); returns the checkpoint.

    A mismatch (a checkpoint of another config) raises CheckpointError listing the missing/unexpected keys.
    """
    device = next(model.parameters()).device
    state = load_checkpoint(path, map_location=device)
    own = model.state_dict()
    missing = [k for k in own if k not in state["model"]]
    unexpected = [k for k in state["model"] if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match the model (was it trained with another config?): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"checkpoint {path} does not match the model: {e}") from e
    return state


def rng_state() -> dict[str, Any]:
    """This process's random states (Python, NumPy's global generator, torch CPU and every CUDA device)
    as plain data that a ``weights_only`` load accepts."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].cpu().numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in states])


def _finite_or_none(x: float):
    return x if math.isfinite(x) else None


def training_state(trainer, metrics: Optional[dict] = None, full: bool = True, gather: bool = True) -> dict:
    """The checkpoint of ``trainer`` (a :class:`mtvision.engine.Trainer`): the model, config and metrics;
    with ``full`` also everything a resume needs (optimizer, scheduler, scaler, balancer, every rank's
    random state, data position, counters, best, history). ``gather``: collect the random states of
    every process (a collective: every process must call it); without it only this process's."""
    from ..config import config_to_dict
    from ..distributed import all_gather_objects
    from .evaluator import scalar_metrics

    t = trainer
    state = {"format": CHECKPOINT_FORMAT, "iteration": t.iteration, "model": t.model.state_dict(),
             "metrics": scalar_metrics(metrics if metrics is not None else t.last_metrics),
             "config": config_to_dict(t.cfg)}
    if not full:
        return state
    rng = all_gather_objects(rng_state()) if gather else [rng_state()]
    epoch, batch_in_epoch = t.data_position
    state.update({
        "optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
        "balancer": t.balancer.state_dict(), "rng": rng,
        "data": {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "world_size": len(rng)},
        "counters": {"skipped_steps": t.skipped_steps, "consecutive_skips": t.consecutive_skips,
                     "skipped_samples": t.skipped_samples, "skipped_files": dict(t.skipped_files)},
        "best": {"iteration": t.best["iteration"], "score": _finite_or_none(t.best["score"]),
                 "metrics": scalar_metrics(t.best["metrics"])},
        "history": [scalar_metrics(h) for h in t.history],
    })
    if t.scaler.is_enabled():
        state["scaler"] = t.scaler.state_dict()
    if getattr(t, "relations", None) is not None:
        state["relations"] = t.relations.state_dict()
    return state


def _load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """The optimizer's state and hyperparameters from a checkpoint, keeping this run's choice of
    implementation (``optimizer.fused``): torch would take the checkpoint's, so a checkpoint of a run
    without the fused update would resume without it. The step counters go where the implementation
    keeps them (on the parameters' device for the fused update, else on the host)."""
    keys = ("fused", "foreach", "capturable")
    chosen = [{k: g[k] for k in keys if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, how in zip(optimizer.param_groups, chosen):
        group.update(how)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if torch.is_tensor(step):
                optimizer.state[p]["step"] = step.to(device=p.device if on_device else "cpu",
                                                     dtype=torch.float32)


def restore_training_state(trainer, path: PathLike) -> None:
    """Continue ``trainer`` from checkpoint ``path`` exactly where it stopped.

    CheckpointError naming the file when it is not a resumable checkpoint of this experiment (another
    model config, tasks or balancer, or a weights-only ``best.pth``)."""
    from ..config import config_to_dict

    t = trainer
    path = Path(path)
    state = load_checkpoint(path, map_location=t.device)
    missing = [k for k in ("optimizer", "scheduler", "rng", "data") if k not in state]
    if missing:
        raise CheckpointError(f"{path} cannot be resumed from: no {', '.join(missing)} (a weights-only "
                              f"best.pth or a checkpoint of an older mtvision; resume from last.pth, or "
                              f"start from these weights with model.backbone.pretrained)")
    saved = state.get("config", {})
    for key in ("model", "balancer"):
        if saved.get(key) != config_to_dict(getattr(t.cfg, key)):
            raise CheckpointError(f"{path} was trained with another {key} config than {t.cfg.work_dir}'s; "
                                  f"resume with the config it was written with")
    if saved.get("data", {}).get("tasks") != list(t.tasks):
        raise CheckpointError(f"{path} was trained on tasks {saved.get('data', {}).get('tasks')}, "
                              f"this config has {t.tasks}")
    t.model.load_state_dict(state["model"])
    _load_optimizer_state(t.optimizer, state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    # the schedule follows this run's config (train.max_iters may have grown), not the saved one's
    from .builders import LRLambda

    sched = t.scheduler
    sched.lr_lambdas = [LRLambda(t.cfg.schedule, t.cfg.train.max_iters) for _ in sched.lr_lambdas]
    for group, base, factor in zip(t.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * factor(sched.last_epoch)
    if "scaler" in state and t.scaler.is_enabled():
        t.scaler.load_state_dict(state["scaler"])
    t.balancer.load_state_dict(state.get("balancer") or {})
    if getattr(t, "relations", None) is not None:
        t.relations.load_state_dict(state.get("relations") or {})
    t.iteration = int(state["iteration"])
    data = state["data"]
    t.data_position = (int(data["epoch"]), int(data["batch_in_epoch"]))
    counters = state.get("counters", {})
    t.skipped_steps = int(counters.get("skipped_steps", 0))
    t.consecutive_skips = int(counters.get("consecutive_skips", 0))
    t.skipped_samples = int(counters.get("skipped_samples", 0))
    t.skipped_files = dict(counters.get("skipped_files", {}))
    best = state.get("best") or {}
    score = best.get("score")
    t.best = {"iteration": best.get("iteration"), "score": -math.inf if score is None else float(score),
              "metrics": dict(best.get("metrics", {}))}
    t.history = [dict(h) for h in state.get("history", [])]
    t.last_metrics = dict(state.get("metrics", {}))
    rng = state["rng"]
    world = t.env.world_size
    same_split = int(data.get("world_size", 1)) == world and len(rng) == world
    if not same_split:
        warnings.warn(f"{path} was written by {data.get('world_size')} processes, this run has {world}: the "
                      f"data order continues, random states restart from rank 0's", stacklevel=3)
    set_rng_state(rng[t.env.rank] if same_split else rng[0])
    t.resumed_from = str(path)
