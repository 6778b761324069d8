"""Shared plumbing of the command-line tools: config + overrides arguments (merged with the config stored in
the checkpoint for the tools that read one), model loading, error exits."""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import (Config, ConfigError, ModelConfig, apply_overrides, config_from_dict, config_to_dict,
                      load_config)
from ..data.io import DataError
from .builders import build_dataloader, check_amp, check_input_size, check_tasks, resolve_device
from .checkpoint import CheckpointError, load_checkpoint, load_model_weights

__all__ = ["CHECKPOINT_CONFIG_HELP", "RUN_DATA_KEYS", "add_config_arguments", "checkpoint_config", "is_user_error",
           "checkpoint_tool_parser", "config_for_checkpoint", "config_from_args", "exit_on_user_error",
           "load_trained_model", "peek_checkpoint", "previous_run", "remove_previous_run",
           "tasks_without_baseline", "val_loader"]

#: The ``data`` settings that define what a trained model was evaluated on: a tool reading a checkpoint
#: takes them from the config stored in it.
RUN_DATA_KEYS = ("dataset", "root", "val_split", "size", "num_classes", "tasks", "mean", "std", "keep_ratio",
                 "num_val", "kwargs")

CHECKPOINT_CONFIG_HELP = """\
config: CONFIG may be left out when the checkpoint stores its config (every checkpoint tools/train.py
writes does). The model, custom_imports, the seed (it draws the synthetic validation scenes) and the
data settings that define the run (data.dataset, root,
val_split, size, num_classes, tasks, mean, std, keep_ratio, num_val, kwargs) come from the checkpoint;
a CONFIG given applies on top of the stored config for everything else (data.batch_size,
data.num_workers, train.device, train.amp, ...). key=value overrides apply last, and a data override
wins over the checkpoint (to evaluate at another size on purpose). A model key that CONFIG or an
override sets to another value than the checkpoint's is an error (the weights fix the architecture).
The tool prints which settings came from the checkpoint. A checkpoint without a stored config (an
older format) needs CONFIG, which is then used as it is.
"""

_BACKBONE_PRETRAINED = "model.backbone.pretrained"
_MISSING = object()
_WORKER_WRAPPER = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.")


def add_config_arguments(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    """``CONFIG`` (with ``optional``: may be left out) and trailing ``key=value`` overrides."""
    help_text = "experiment YAML, e.g. configs/synthetic/mtl_resnet18.yaml"
    if optional:
        parser.add_argument("config", nargs="?", default=None,
                            help=f"{help_text} (optional with a checkpoint storing its config; see below)")
    else:
        parser.add_argument("config", help=help_text)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, value parsed as YAML (e.g. train.max_iters=100)")


def checkpoint_tool_parser(doc: str, out_help: Optional[str] = None,
                           checkpoint_required: bool = True) -> argparse.ArgumentParser:
    """The parser of a tool that reads a trained checkpoint: its docstring as description, an optional
    ``CONFIG``, the ``key=value`` overrides, ``--checkpoint`` (required unless ``checkpoint_required`` is
    False) and, with ``out_help``, a required ``--out``; the epilog says how the config is put together
    (:data:`CHECKPOINT_CONFIG_HELP`)."""
    parser = argparse.ArgumentParser(description=doc, epilog=CHECKPOINT_CONFIG_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, optional=True)
    parser.add_argument("--checkpoint", required=checkpoint_required, help="a .pth written by tools/train.py")
    if out_help is not None:
        parser.add_argument("--out", required=True, help=out_help)
    return parser


def peek_checkpoint(path) -> dict[str, Any]:
    """Checkpoint ``path`` memory-mapped on the CPU: its entries without reading the weights from disk.
    FileNotFoundError / CheckpointError name the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a file mmap cannot read: the plain load says what is wrong with it
        return load_checkpoint(path)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not an mtvision checkpoint (no 'model' entry)")
    return state


CHECKPOINTS = ("last.pth", "best.pth")


def previous_run(work_dir: Path) -> Optional[str]:
    """``"iteration N"`` of the run whose checkpoints ``work_dir`` holds, None when it holds none."""
    found = [p for p in (Path(work_dir) / "checkpoints" / name for name in CHECKPOINTS) if p.is_file()]
    if not found:
        return None
    try:
        return f"iteration {peek_checkpoint(found[0]).get('iteration')}"
    except (CheckpointError, OSError):
        return f"{found[0].name} unreadable"


def remove_previous_run(work_dir: Path) -> None:
    """Delete the previous run's ``checkpoints/``, ``metrics.json`` and ``tb/`` from ``work_dir``."""
    work_dir = Path(work_dir)
    for name in ("checkpoints", "tb"):
        if (work_dir / name).is_dir():
            shutil.rmtree(work_dir / name)
    (work_dir / "metrics.json").unlink(missing_ok=True)


def checkpoint_config(path) -> Optional[dict]:
    """The config stored in checkpoint ``path`` (a plain dict), or None for a checkpoint without one."""
    saved = peek_checkpoint(path).get("config")
    return copy.deepcopy(saved) if isinstance(saved, dict) and saved else None


def _leaves(d: dict, prefix: str) -> dict[str, Any]:
    """``{"prefix.a.b": value}`` for every leaf of the nested dict ``d`` (an empty dict is a leaf)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict) and v:
            out.update(_leaves(v, key))
        else:
            out[key] = v
    return out


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _check_model(saved: dict, stated: dict, override_keys: Sequence[str], from_file: bool) -> None:
    """ConfigError naming the first ``model.*`` key that the config file or an override sets to another
    value than the checkpoint's (``saved``); ``stated`` is the model section of the file with the
    overrides (of the stored config with the overrides when no file is given)."""
    saved_leaves, stated_leaves = _leaves(saved, "model"), _leaves(stated, "model")
    defaults = _leaves(config_to_dict(ModelConfig()), "model")

    def set_explicitly(key: str) -> bool:
        if any(key == k or key.startswith(k + ".") for k in override_keys):
            return True
        # A section the file leaves out reads as its default, so only a value other than the default is
        # known to be the file's own.
        return from_file and key in stated_leaves and stated_leaves[key] != defaults.get(key, _MISSING)

    conflicts = []
    for key in [*stated_leaves, *(k for k in saved_leaves if k not in stated_leaves)]:
        # the pretrained file only initialised training: the checkpoint holds every weight
        if key == _BACKBONE_PRETRAINED or not set_explicitly(key):
            continue
        trained, says = saved_leaves.get(key, _MISSING), stated_leaves.get(key, _MISSING)
        if trained != says:
            conflicts.append((key, trained, says))
    if not conflicts:
        return
    key, trained, says = conflicts[0]
    trained = "without it" if trained is _MISSING else f"with {_show(trained)}"
    says = "leaves it out" if says is _MISSING else f"says {_show(says)}"
    more = f" (and {', '.join(k for k, _, _ in conflicts[1:])})" if len(conflicts) > 1 else ""
    fix = ("leave CONFIG out (the checkpoint stores its own config) or these model keys"
           if from_file else "leave these model overrides out")
    raise ConfigError(f"{key}: the checkpoint was trained {trained}, the config/override {says}{more}; "
                      f"{fix} to use the checkpoint's")


def config_for_checkpoint(checkpoint, config=None, overrides: Sequence[str] = ()) -> tuple[Config, str]:
    """``(Config, note)`` of a tool that reads ``checkpoint``: its stored config, ``config`` (a YAML path
    or None) and ``key=value`` ``overrides`` put together as :data:`CHECKPOINT_CONFIG_HELP` says;
    ``note`` is one line saying which settings came from the checkpoint."""
    overrides = list(overrides)
    saved = checkpoint_config(checkpoint)
    if saved is None:
        if config is None:
            raise ConfigError(f"{checkpoint} stores no config (a checkpoint of an older mtvision): "
                              f"give CONFIG")
        return load_config(config, overrides), f"{checkpoint} stores no config: using {config} as it is"
    source = f"the config stored in {checkpoint}"
    override_keys = [o.split("=", 1)[0].strip() for o in overrides if isinstance(o, str)]
    if config is None:
        cfg = apply_overrides(config_from_dict(saved, source), overrides)
        _check_model(saved.get("model", {}), config_to_dict(cfg.model), override_keys, from_file=False)
        with_overrides = f", with {' '.join(overrides)}" if overrides else ""
        return cfg, f"config: the one stored in {checkpoint}{with_overrides}"

    file_cfg = config_to_dict(load_config(config))
    _check_model(saved.get("model", {}), config_to_dict(load_config(config, overrides).model), override_keys,
                 from_file=True)
    merged = copy.deepcopy(file_cfg)
    merged["model"] = saved.get("model", file_cfg["model"])
    taken = ["model"]
    stored_imports = saved.get("custom_imports") or []
    if stored_imports:
        extra = [m for m in file_cfg.get("custom_imports", []) if m not in stored_imports]
        merged["custom_imports"] = [*stored_imports, *extra]
        taken.append("custom_imports")
    data_keys = [k for k in RUN_DATA_KEYS if k in saved.get("data", {})]
    for k in data_keys:  # the overrides, applied next, still win
        merged["data"][k] = saved["data"][k]
    seed_taken = "seed" in saved and "seed" not in override_keys
    if seed_taken:  # it draws the synthetic validation scenes
        merged["seed"] = saved["seed"]
    cfg = apply_overrides(config_from_dict(merged, source), overrides)
    final = config_to_dict(cfg.data)
    differing = []
    for k in data_keys:
        if f"data.{k}" in override_keys:
            continue
        taken.append(f"data.{k}")
        if final[k] != file_cfg["data"][k]:
            differing.append(f"data.{k} {_show(final[k])} (not {_show(file_cfg['data'][k])})")
    if seed_taken:
        taken.append("seed")
    note = f"settings from the checkpoint {checkpoint}: {', '.join(taken)}"
    if differing:
        note += f"; differing from {config}: {', '.join(differing)}"
    return cfg, note


def config_from_args(args: argparse.Namespace) -> Config:
    """The config of a tool: ``args.config`` with ``args.overrides`` applied or, for a tool with
    ``args.checkpoint``, :func:`config_for_checkpoint` (its note printed by the first process)."""
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint is None:
        return load_config(args.config, args.overrides)
    # The optional CONFIG takes the first positional word even when that is an override: CONFIG is the
    # word that is not key=value (or names a file), wherever it stands.
    words = [w for w in (args.config, *args.overrides) if w is not None]
    at = next((i for i, w in enumerate(words) if "=" not in w or os.path.isfile(w)), None)
    args.config = None if at is None else words.pop(at)
    args.overrides = words
    cfg, note = config_for_checkpoint(checkpoint, args.config, args.overrides)
    if int(os.environ.get("RANK", "0")) == 0:
        print(note)
    return cfg


def _user_message(e: Exception) -> str:
    """``str(e)``, without the wrapper a DataLoader worker puts around an exception it passes on."""
    text = str(e)
    wrapped = _WORKER_WRAPPER.match(text)
    if wrapped:
        at = text.rfind(f"{wrapped.group(1)}: ")
        if at >= 0:
            return text[at + len(wrapped.group(1)) + 2:].strip()
    return text


def is_user_error(e: Exception) -> bool:
    """True for the errors a user fixes (config, file, data, checkpoint): one line, exit status 2."""
    if isinstance(e, (ConfigError, FileNotFoundError, CheckpointError, DataError)):
        return True
    # A DataError raised in a DataLoader worker comes back as a RuntimeError (DataError's constructor
    # takes three arguments, so torch cannot rebuild it) whose message starts with this wrapper.
    wrapped = _WORKER_WRAPPER.match(str(e)) if isinstance(e, RuntimeError) else None
    return wrapped is not None and wrapped.group(1) == DataError.__name__


def exit_on_user_error(main: Callable[[Optional[Sequence[str]]], int]):
    """Decorator for a tool's ``main(argv) -> int``: a config, file, data or checkpoint error (also one
    raised in a DataLoader worker process) prints ``error: <message>`` on stderr and returns 2 instead of
    a traceback."""
    @functools.wraps(main)
    def wrapper(argv: Optional[Sequence[str]] = None) -> int:
        try:
            return main(argv)
        except (ConfigError, FileNotFoundError, CheckpointError, DataError, RuntimeError) as e:
            if not is_user_error(e):
                raise
            print(f"error: {_user_message(e)}", file=sys.stderr)
            return 2
    return wrapper


def tasks_without_baseline(tasks, baselines) -> list[str]:
    """The tasks of ``tasks`` that no ``"task/metric"`` key of ``baselines`` belongs to (Δm leaves them
    out)."""
    covered = {k.split("/", 1)[0] for k in baselines}
    return [t for t in tasks if t not in covered]


def load_trained_model(cfg: Config, checkpoint: str):
    """``(model, checkpoint dict, device)``: ``build_model(cfg.model)`` on ``cfg.train.device`` with the
    weights of ``checkpoint``, in eval mode (on this process's GPU when a process group is running)."""
    from ..distributed import dist_env
    from ..models import build_model

    check_tasks(cfg)
    device = resolve_device(cfg.train.device)
    env = dist_env()
    if device.type == "cuda" and env.distributed:  # a tool started the process group: its own GPU
        device = torch.device("cuda", env.local_rank)
    check_amp(cfg.train.amp, device)
    model_cfg = config_to_dict(cfg.model)
    if model_cfg["backbone"].get("pretrained") is not None:
        # the checkpoint holds every weight: the file that initialised training need not exist here
        model_cfg["backbone"]["pretrained"] = None
    model = build_model(model_cfg).to(device)
    check_input_size(model, cfg.data.size)
    state = load_model_weights(model, checkpoint)
    model.eval()
    return model, state, device


def val_loader(cfg: Config):
    """``(val dataset, loader)`` of ``cfg``'s validation split, in order (this process's share of it
    under torch.distributed: every sample is evaluated exactly once over all processes)."""
    from ..data.builders import build_dataset
    from ..distributed import dist_env

    env = dist_env()
    dataset = build_dataset(cfg.data, "val", cfg.seed)
    return dataset, build_dataloader(dataset, cfg.data.batch_size, cfg.data.num_workers, train=False,
                                     rank=env.rank, world_size=env.world_size)
