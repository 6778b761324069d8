#!/usr/bin/env python
"""Evaluate a checkpoint on the validation split:
``python tools/eval.py CONFIG --checkpoint PATH [--out FILE] [key=value ...]``.

Prints a table of every metric and, with ``--out``, writes ``{"checkpoint", "iteration", "metrics"}`` as
JSON (metrics flat, ``"task/metric"``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import mtvision  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtvision.engine import autocast_context, evaluate_model, write_json
from mtvision.engine.cli import (add_config_arguments, config_from_args, exit_on_user_error,
                                 load_trained_model, val_loader)
from mtvision.engine.logging import format_table


@exit_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", required=True, help="a .pth written by tools/train.py")
    parser.add_argument("--out", help="write the metrics to this JSON file")
    args = parser.parse_intermixed_args(argv)
    cfg = config_from_args(args)
    model, state, device = load_trained_model(cfg, args.checkpoint)
    dataset, loader = val_loader(cfg)
    metrics = evaluate_model(model, loader, list(cfg.data.tasks), cfg.data.num_classes,
                             cfg.loss.ignore_index, device, autocast_context(cfg.train.amp, device),
                             getattr(dataset, "classes", None))
    title = f"{Path(args.checkpoint).name} (iter {state.get('iteration')})"
    print(format_table(list(metrics), {title: metrics}))
    if args.out:
        write_json({"checkpoint": str(args.checkpoint), "iteration": state.get("iteration"),
                    "num_samples": len(dataset), "metrics": metrics}, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
