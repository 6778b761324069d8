"""Checkpoints: atomic writes, ``weights_only`` loads, and loading a model's weights from one.

A checkpoint is a dict of plain data only (tensors, dicts, lists, str, numbers, None), so
``torch.load(..., weights_only=True)`` reads it without unpickling arbitrary objects::

    {"format": 2, "iteration": int, "model": state_dict, "optimizer": state_dict,
     "scheduler": state_dict, "scaler": state_dict | absent, "balancer": state | absent,
     "metrics": {"task/metric": float}, "best_score": float | None, "config": config_to_dict(cfg),
     "rng": [rng_state() of each rank], "data": {"epoch", "batch_in_epoch", "world_size"},
     "counters": {...}, "best": {...}, "history": [...]}

Format 1 (before resumable training) lacks the last six; it still loads for evaluation and inference.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import nn

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "save_checkpoint", "load_checkpoint", "load_model_weights",
           "rng_state", "set_rng_state"]

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
