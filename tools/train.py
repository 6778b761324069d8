#!/usr/bin/env python
"""Train a model: ``python tools/train.py CONFIG [key=value ...]``.

Writes the work dir (``config.yaml``, ``train.log``, TensorBoard events in ``tb/``,
``checkpoints/last.pth`` and ``best.pth``, ``metrics.json``) and prints the final validation metrics.
Exit status 2 with ``error: <message naming the key>`` for a bad config, a missing file or checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import mtvision  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtvision.engine import Trainer
from mtvision.engine.cli import add_config_arguments, config_from_args, exit_on_user_error
from mtvision.engine.logging import format_table


@exit_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_intermixed_args(argv)
    cfg = config_from_args(args)
    trainer = Trainer(cfg, progress=False if args.no_progress else None)
    metrics = trainer.train()
    rows = [k for k in metrics if k.count("/") == 1]
    print(format_table(rows, {f"iter {trainer.iteration}": metrics,
                              f"best (iter {trainer.best['iteration']})": trainer.best["metrics"]}))
    print(f"work dir: {trainer.work_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
