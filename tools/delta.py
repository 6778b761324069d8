#!/usr/bin/env python
"""Δm of multi-task results against single-task baselines, from metrics files:
``python tools/delta.py RESULTS.json [RESULTS.json ...] --baselines FILE [FILE ...] [--metrics KEY ...]``.

A metrics file is a ``metrics.json`` of tools/train.py (its final evaluation), the ``--out`` file of
tools/eval.py, or a plain JSON object ``{"seg/mIoU": 53.9, "depth/abs_err": 0.38, ...}``. Baselines are
merged from every ``--baselines`` file (typically one per single-task run): a plain object gives every key
it lists, a train/eval file the standard Δm metrics it reports (seg mIoU, pixAcc; depth abs_err, rel_err;
normal mean, median, within 11.25/22.5/30). ``--metrics`` picks the keys instead.

Prints a Markdown table, one row per results file: each metric with its relative change in percent as
it enters Δm (negative = better), and Δm (mean of those, lower is better; Nash-MTL / FAMO convention).
A task that a results file reports (a ``"task/..."`` key) but no baseline covers is named in a warning on
stderr, one line per task (without ``--metrics``, which picks the keys on purpose): Δm leaves it out.
The tasks a run trained as auxiliary (``train.auxiliary_tasks``, recorded in its ``metrics.json``) are
left out of Δm for every row, with a note on stderr.
Exit status 1 when a results file lacks a baseline metric (its row says which), 2 on a bad file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtvision.engine.cli import exit_on_user_error, tasks_without_baseline
from mtvision.evaluation import (delta_m, delta_table, read_auxiliary_tasks, read_baselines, read_metrics,
                                 without_tasks)


@exit_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("results", nargs="+", help="metrics files of the models to compare")
    parser.add_argument("--baselines", nargs="+", required=True,
                        help="metrics file(s) of the single-task runs")
    parser.add_argument("--metrics", nargs="+", help="Δm over these keys (default: see above)")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    try:
        baselines = read_baselines(args.baselines, args.metrics)
        results = {path: read_metrics(path) for path in args.results}
        auxiliary = {path: read_auxiliary_tasks(path) for path in args.results}
        left_out = sorted({t for tasks in auxiliary.values() for t in tasks})
        if left_out:  # trained as auxiliary tasks: not part of the comparison
            baselines = without_tasks(baselines, left_out)
            print(f"note: auxiliary task(s) {', '.join(left_out)} (train.auxiliary_tasks of "
                  f"{', '.join(p for p, t in auxiliary.items() if t)}): left out of Δm", file=sys.stderr)
            if not baselines:
                raise ValueError("no baseline metric is left once the auxiliary tasks are left out")
            results = {p: without_tasks(m, left_out) for p, m in results.items()}
        table = delta_table(results, baselines)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.metrics:
        reported: dict[str, list[str]] = {}  # task -> the results files that report it
        for path, metrics in results.items():
            for task in dict.fromkeys(k.split("/", 1)[0] for k in metrics if "/" in k):
                reported.setdefault(task, []).append(path)
        for task in tasks_without_baseline(reported, baselines):
            print(f"warning: no baseline metric of task {task!r} in {' '.join(args.baselines)} (reported by "
                  f"{', '.join(reported[task])}); Δm leaves it out", file=sys.stderr)
    print(table, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
        print(f"wrote {args.out}")
    failed = []
    for path, metrics in results.items():
        try:
            delta_m(metrics, baselines)
        except ValueError:
            failed.append(path)
    if failed:  # the table says why in the row's Δm cell
        print(f"error: no Δm for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
