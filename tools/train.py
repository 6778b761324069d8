#!/usr/bin/env python
"""Train a model: ``python tools/train.py CONFIG [key=value ...] [--resume [PATH]]``, or the same command
under ``torchrun --nproc_per_node=N [--nnodes=M --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT]`` for
distributed data-parallel training (``data.batch_size`` stays the global batch).

Writes the work dir (``config.yaml``, ``train.log``, TensorBoard events in ``tb/``,
``checkpoints/last.pth`` and ``best.pth``, ``metrics.json``) and prints the final validation metrics.
``--resume`` continues from ``work_dir/checkpoints/last.pth`` when it exists (else starts fresh: use it
with ``torchrun --max-restarts``); ``--resume PATH`` continues from that checkpoint.
SIGTERM / SIGINT: the current step finishes, ``last.pth`` is saved, exit status 0.
Exit status 2 with ``error: <message naming the key>`` for a bad config, a missing file or checkpoint;
1 when training cannot go on (e.g. too many non-finite steps in a row).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import mtvision  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist

from mtvision.engine import Trainer
from mtvision.engine.cli import add_config_arguments, config_from_args, exit_on_user_error
from mtvision.engine.logging import format_table
from mtvision.engine.trainer import TrainingError

AUTO = "auto"


@exit_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--resume", nargs="?", const=AUTO, default=None, metavar="PATH",
                        help="continue from PATH, or (no PATH) from the work dir's checkpoints/last.pth if present")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_intermixed_args(argv)
    cfg = config_from_args(args)
    try:
        trainer = Trainer(cfg, progress=False if args.no_progress else None)
        if args.resume is not None:
            path = Path(cfg.work_dir) / "checkpoints" / "last.pth" if args.resume == AUTO else Path(args.resume)
            if args.resume != AUTO or path.is_file():
                trainer.resume(path)
        try:
            metrics = trainer.train()
        except TrainingError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        if not trainer.is_main:
            return 0
        if trainer.stopped_by:
            print(f"stopped by {trainer.stopped_by} at iteration {trainer.iteration}; "
                  f"continue with: python tools/train.py {args.config} ... --resume")
            return 0
        rows = [k for k in metrics if k.count("/") == 1]
        print(format_table(rows, {f"iter {trainer.iteration}": metrics,
                                  f"best (iter {trainer.best['iteration']})": trainer.best["metrics"]}))
        print(f"work dir: {trainer.work_dir}")
        return 0
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
