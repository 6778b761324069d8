#!/usr/bin/env python
"""Train a model: python tools/train.py CONFIG [key=value ...] [--resume [PATH] | --overwrite]

Writes the work dir (CONFIG's work_dir): config.yaml (the config with every override, enough to resume
the run), train.log, TensorBoard events in tb/, checkpoints/last.pth (every train.checkpoint_interval
iterations, at the end and when stopped) and checkpoints/best.pth (best validation score), and
metrics.json at the end; then prints the final validation metrics.

A work dir that already holds checkpoints/last.pth or best.pth is never written over silently: the
run stops with an error unless it is continued with --resume or started again with --overwrite.
  --resume         continue from the work dir's checkpoints/last.pth when it exists, else start fresh
                   (so the same command serves torchrun --max-restarts)
  --resume PATH    continue from that checkpoint
  --overwrite      delete the previous run's checkpoints/, metrics.json and tb/ first (train.log is
                   appended to), then train from scratch

SIGTERM / SIGINT: the current step finishes, checkpoints/last.pth is saved, and the command that resumes
the run is printed: python tools/train.py WORK_DIR/config.yaml --resume

Exit status:
  0  training done, or stopped by a signal with checkpoints/last.pth saved
  1  training failed (e.g. too many non-finite steps in a row); checkpoints/last.pth is saved at the
     failure where that is possible, to continue with --resume
  2  user error, printed as one line "error: ...": a bad config (naming the key), a missing or
     unreadable data file, a bad checkpoint, or a work dir holding a previous run

Distributed data-parallel training: the same command under torchrun (data.batch_size stays the global
batch), e.g. on 4 GPUs of one machine, or on 2 machines (run on each):
  torchrun --nproc_per_node=4 tools/train.py configs/nyuv2/mtl_ew.yaml data.root=/data/nyuv2 train.amp=bf16
  torchrun --nproc_per_node=4 --nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
      tools/train.py configs/nyuv2/mtl_ew.yaml data.root=/data/nyuv2 --resume
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mtvision.distributed import close_process_group
from mtvision.engine import Trainer
from mtvision.engine.cli import (add_config_arguments, config_from_args, exit_on_user_error, is_user_error,
                                 previous_run, remove_previous_run)
from mtvision.engine.logging import format_table
from mtvision.engine.trainer import TrainingError

AUTO = "auto"


@exit_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--resume", nargs="?", const=AUTO, default=None, metavar="PATH",
                        help="continue from PATH, or (no PATH) from the work dir's checkpoints/last.pth "
                             "if present")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete a previous run's checkpoints/, metrics.json and tb/ in the work dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_intermixed_args(argv)
    if args.resume is not None and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    cfg = config_from_args(args)
    work_dir = Path(cfg.work_dir)
    # Decided from the files alone, before anything is written, so every torchrun process decides alike.
    previous = previous_run(work_dir) if args.resume is None else None
    if previous is not None:
        first_on_node = int(os.environ.get("LOCAL_RANK", "0")) == 0
        if not args.overwrite:
            if first_on_node:
                print(f"error: {work_dir} already holds checkpoints of a run ({previous}); continue it with "
                      f"--resume, or start again with --overwrite (deletes them)", file=sys.stderr)
            return 2
        if int(os.environ.get("RANK", "0")) == 0:
            remove_previous_run(work_dir)
            print(f"--overwrite: deleted the previous run ({previous}) from {work_dir}")
    try:
        trainer = Trainer(cfg, progress=False if args.no_progress else None)
        if args.resume is not None:
            path = work_dir / "checkpoints" / "last.pth" if args.resume == AUTO else Path(args.resume)
            if args.resume != AUTO or path.is_file():
                trainer.resume(path)
        try:
            metrics = trainer.train()
        except TrainingError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except Exception as e:  # noqa: BLE001 - a failure after training started: one line, details in train.log
            if is_user_error(e):
                raise  # exit_on_user_error prints it (status 2)
            first = (str(e).strip().splitlines() or [""])[-1]
            print(f"error: training failed at iteration {trainer.iteration}: {type(e).__name__}: {first} "
                  f"(last.pth saved; the traceback is in {Path(trainer.work_dir) / 'train.log'})", file=sys.stderr)
            return 1
        if not trainer.is_main:
            return 0
        if trainer.stopped_by:
            print(f"stopped by {trainer.stopped_by} at iteration {trainer.iteration}; continue with: "
                  f"python tools/train.py {Path(trainer.work_dir) / 'config.yaml'} --resume")
            return 0
        auxiliary = set(cfg.train.auxiliary_tasks)
        rows = [k for k in metrics if k.count("/") == 1]
        rows = [k for k in rows if k.split("/")[0] not in auxiliary] + \
               [k for k in rows if k.split("/")[0] in auxiliary]
        print(format_table(rows, {f"iter {trainer.iteration}": metrics,
                                  f"best (iter {trainer.best['iteration']})": trainer.best["metrics"]}))
        if auxiliary:
            print(f"auxiliary (not in the best-checkpoint score nor in Δm): {', '.join(sorted(auxiliary))}")
        print(f"work dir: {trainer.work_dir}")
        return 0
    finally:
        trainer = None  # noqa: F841 - it holds the process group (close_process_group says why)
        close_process_group()


if __name__ == "__main__":
    sys.exit(main())
