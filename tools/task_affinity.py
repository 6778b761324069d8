#!/usr/bin/env python
"""Which tasks help or hurt each other, from a short training run:
``python tools/task_affinity.py CONFIG [key=value ...] --out DIR [--iters N] [--every N] [--lr LR]``.

Trains the config's model (``CONFIG`` with the overrides; work dir ``DIR/run``) for ``--iters`` steps
(default: the config's ``train.max_iters``) and every ``--every`` steps measures, on the step's batch and at
the parameters the step starts from:

- the lookahead inter-task affinity of TAG (Fifty et al., NeurIPS 2021),
  ``Z[i, j] = 1 - L_j(theta_s - lr * g_i) / L_j(theta_s)``: the relative decrease of task j's loss after an
  SGD step of the shared parameters along task i's gradient alone (``--lr``, default the optimizer's
  current learning rate);
- the cosine similarity of the task gradients on the shared parameters (and how often each pair conflicts).

Writes ``DIR/affinity.json`` (``tasks``, ``affinity`` and ``cosine`` T x T, ``conflict_fraction``,
``groupings`` per budget k: the groups TAG's network selection picks and their predicted score),
``DIR/affinity.png`` and ``DIR/cosine.png`` (heatmaps), and prints the tables. A ``DIR`` that holds a
previous call's results is refused unless ``--overwrite``. Runs under torchrun
as training does (the measurements are averaged over the processes: the same as one process on the
global batch).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import cv2

from mtvision.config import ConfigError, apply_overrides
from mtvision.engine import Trainer, write_json
from mtvision.distributed import close_process_group
from mtvision.engine.cli import (add_config_arguments, config_from_args, exit_on_user_error, previous_run,
                                 remove_previous_run)
from mtvision.relations import groupings_for_budgets, heatmap
from mtvision.relations.hook import relations_table


@exit_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_config_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--iters", type=int, help="training steps (default: train.max_iters)")
    parser.add_argument("--every", type=int, default=5, help="measure every N steps (default 5)")
    parser.add_argument("--lr", type=float, help="the lookahead's SGD step (default: the optimizer's lr)")
    parser.add_argument("--no-overlap", action="store_true",
                        help="groupings that partition the tasks (default: groups may share tasks, as TAG)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results and the run a previous call left in --out")
    args = parser.parse_intermixed_args(argv)
    if args.every < 1 or (args.iters is not None and args.iters < 1):
        parser.error("--every and --iters must be positive")
    cfg = config_from_args(args)
    iters = args.iters or cfg.train.max_iters
    if args.every > iters:
        parser.error(f"--every {args.every} is more than the {iters} training steps: nothing would be "
                     f"measured")
    extra = [f"work_dir={args.out / 'run'}", f"train.max_iters={iters}",
             f"train.affinity_interval={args.every}", f"train.monitor_interval={args.every}",
             f"train.eval_interval={iters}", f"train.checkpoint_interval={iters}"]
    if args.lr is not None:
        extra.append(f"train.affinity_lr={args.lr}")
    cfg = apply_overrides(cfg, extra)
    if len(cfg.data.tasks) < 2:
        raise ConfigError(f"data.tasks: task relations need at least two tasks, got {list(cfg.data.tasks)}")
    # decided from the files alone, before anything is written, so every torchrun process decides alike
    previous = previous_run(args.out / "run") or (args.out / "affinity.json").is_file()
    if previous and not args.overwrite:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"error: {args.out} already holds the results of a previous call; choose another --out, or "
                  f"--overwrite to replace them", file=sys.stderr)
        return 2
    if previous and int(os.environ.get("RANK", "0")) == 0:
        remove_previous_run(args.out / "run")
        (args.out / "affinity.json").unlink(missing_ok=True)
    trainer = Trainer(cfg, progress=False if args.no_progress else None)
    try:
        trainer.train()
        summary = trainer.relations.summary() if trainer.is_main else None
        work_dir, iterations = trainer.work_dir, trainer.iteration
        mean_affinity = trainer.relations.mean_affinity
    finally:
        trainer = None  # it holds the process group under torchrun
        close_process_group()
    if summary is None:
        return 0
    if "affinity" not in summary:
        print("error: no affinity was measured (every measurement had a non-finite loss or gradient); see "
              f"{work_dir / 'train.log'}", file=sys.stderr)
        return 1
    tasks = summary["tasks"]
    affinity = summary["affinity"]["mean"]
    groupings = groupings_for_budgets(mean_affinity, tasks, overlap=not args.no_overlap)
    lr = cfg.train.affinity_lr
    out = {"tasks": tasks, "iterations": iterations, "every": args.every,
           "lookahead_lr": lr if lr is not None else "optimizer",
           "affinity": affinity, "affinity_measurements": summary["affinity"]["steps"],
           "cosine": summary["gradients"]["mean_cosine"],
           "conflict_fraction": summary["gradients"]["conflict_fraction"],
           "gradient_measurements": summary["gradients"]["steps"],
           "mean_grad_norm": summary["gradients"]["mean_norm"],
           "groupings": {str(g.k): g.as_dict() for g in groupings}, "overlap": not args.no_overlap}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(out, args.out / "affinity.json")
    pictures = {"affinity.png": heatmap(affinity, tasks, f"lookahead affinity, {iterations} steps",
                                        row_title="row: the task whose step is taken; column: the loss"),
                "cosine.png": heatmap(out["cosine"], tasks, "mean gradient cosine (shared parameters)",
                                      limit=1.0)}
    for name, image in pictures.items():
        cv2.imwrite(str(args.out / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    print(relations_table(summary))
    print("\ngroupings (TAG network selection; score: mean affinity onto each task from its group)")
    for g in groupings:
        groups = "  ".join("{" + ", ".join(grp) + "}" for grp in g.groups)
        print(f"  k={g.k}: {groups}   score {g.score:.4g}")
    print(f"wrote {args.out / 'affinity.json'}, affinity.png, cosine.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
