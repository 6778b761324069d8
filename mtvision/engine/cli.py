"""Shared plumbing of the command-line tools: config + overrides arguments, model loading, error exits."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Optional

import torch

from ..config import Config, ConfigError, config_to_dict, load_config
from .builders import build_dataloader, check_amp, check_tasks, resolve_device
from .checkpoint import CheckpointError, load_model_weights

__all__ = ["add_config_arguments", "checkpoint_tool_parser", "config_from_args", "exit_on_user_error",
           "load_trained_model", "val_loader"]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``CONFIG`` and trailing ``key=value`` overrides."""
    parser.add_argument("config", help="experiment YAML, e.g. configs/synthetic/mtl_resnet18.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, value parsed as YAML (e.g. train.max_iters=100)")


def checkpoint_tool_parser(doc: str, out_help: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of a tool that reads a trained checkpoint: its docstring's first line as description
    (the docstring shown in ``--help``), ``CONFIG``, the ``key=value`` overrides, ``--checkpoint`` and,
    with ``out_help``, a required ``--out``."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", required=True, help="a .pth written by tools/train.py")
    if out_help is not None:
        parser.add_argument("--out", required=True, help=out_help)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """Load ``args.config`` with ``args.overrides`` applied."""
    return load_config(args.config, args.overrides)


def exit_on_user_error(main: Callable[[Optional[Sequence[str]]], int]):
    """Decorator for a tool's ``main(argv) -> int``: a config, file or checkpoint error prints
    ``error: <message>`` on stderr and returns 2 instead of a traceback."""
    @functools.wraps(main)
    def wrapper(argv: Optional[Sequence[str]] = None) -> int:
        try:
            return main(argv)
        except (ConfigError, FileNotFoundError, CheckpointError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return wrapper


def load_trained_model(cfg: Config, checkpoint: str):
    """``(model, checkpoint dict, device)``: ``build_model(cfg.model)`` on ``cfg.train.device`` with the
    weights of ``checkpoint``, in eval mode (on this process's GPU when a process group is running)."""
    from ..models import build_model

    from .distributed import dist_env

    check_tasks(cfg)
    device = resolve_device(cfg.train.device)
    env = dist_env()
    if device.type == "cuda" and env.distributed:  # a tool started the process group: its own GPU
        device = torch.device("cuda", env.local_rank)
    check_amp(cfg.train.amp, device)
    model = build_model(config_to_dict(cfg.model)).to(device)
    state = load_model_weights(model, checkpoint)
    model.eval()
    return model, state, device


def val_loader(cfg: Config):
    """``(val dataset, loader)`` of ``cfg``'s validation split, in order (this process's share of it
    under torch.distributed: every sample is evaluated exactly once over all processes)."""
    from ..data.builders import build_dataset

    from .distributed import dist_env

    env = dist_env()
    dataset = build_dataset(cfg.data, "val", cfg.seed)
    return dataset, build_dataloader(dataset, cfg.data.batch_size, cfg.data.num_workers, train=False,
                                     rank=env.rank, world_size=env.world_size)
