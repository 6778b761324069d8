#!/usr/bin/env python
"""Δm table of task-balancing methods against single-task baselines on synthetic scenes.

``python tools/delta_table.py --out DIR [--iters N] [--seeds 0 1] [--methods ew pcgrad ...] [key=value ...]``

Trains ``configs/synthetic/stl_{seg,depth,normal}.yaml`` and every method (a name from
``configs/synthetic/balancing/`` or a YAML path; default: all of them) once per seed, each through
``tools/train.py`` in ``DIR/<name>/seed<k>`` with the shared overrides; a run whose ``metrics.json``
exists is not trained again and an interrupted one continues from its ``last.pth``, so an interrupted
table resumes. Overrides of ``model.heads.<task>.*`` are passed only to configs that have that head. Δm
(percent, lower is better, ``mtvision.evaluation.delta_m``) is over the NYUv2 metrics of the final
validation, averaged over seeds before comparing. The Markdown table is printed and written to
``DIR/table.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mtvision.balancing import is_gradient_method
from mtvision.config import load_config
from mtvision.engine.cli import exit_on_user_error
from mtvision.evaluation import DELTA_M_METRICS, delta_m

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "synthetic"
BASELINES = {task: CONFIGS / f"stl_{task}.yaml" for task in ("seg", "depth", "normal")}
#: The metrics of Δm (the NYUv2 convention of Nash-MTL / FAMO).
METRICS = list(DELTA_M_METRICS)
COLUMNS = ["seg/mIoU", "depth/abs_err", "normal/mean"]


def method_config(name: str) -> Path:
    """``configs/synthetic/balancing/<name>.yaml``, or ``name`` itself when it is a YAML path."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else CONFIGS / "balancing" / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"--methods: no config {path}")
    return path


def overrides_for(config: Path, overrides: list[str]) -> list[str]:
    """``overrides`` without the ``model.heads.<task>.*`` ones for heads ``config`` does not have."""
    heads = load_config(config).model.heads
    return [o for o in overrides
            if not (o.startswith("model.heads.") and o.split("=", 1)[0].split(".")[2] not in heads)]


def train(config: Path, work_dir: Path, overrides: list[str]) -> dict | None:
    """``work_dir/metrics.json``, training ``config`` first unless it exists; None if training failed."""
    metrics = work_dir / "metrics.json"
    if not metrics.is_file():
        work_dir.mkdir(parents=True, exist_ok=True)
        # --resume: an interrupted run continues (tools/train.py refuses to write over its checkpoints);
        # last, because its optional PATH would take the next argument
        cmd = [sys.executable, str(ROOT / "tools" / "train.py"), str(config), "--no-progress",
               *overrides_for(config, overrides), f"work_dir={work_dir}", "--resume"]
        t0 = time.perf_counter()
        with open(work_dir / "stdout.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        status = "done" if rc == 0 else f"FAILED (exit {rc})"
        print(f"  {work_dir}: {status} in {time.perf_counter() - t0:.0f}s", flush=True)
        if rc != 0 or not metrics.is_file():
            return None
    return json.loads(metrics.read_text())


def mean_over_seeds(runs: list[dict], keys: list[str]) -> dict[str, float]:
    """Per-key mean of the runs' final metrics (NaN where a run lacks the key)."""
    return {k: statistics.fmean(r["final"].get(k, math.nan) for r in runs) for k in keys}


def safe_delta(results: dict, baselines: dict) -> float:
    """Δm in percent, NaN where a metric is missing or not finite (a diverged run)."""
    try:
        return delta_m(results, baselines)
    except ValueError:
        return math.nan


def level(cfg) -> str:
    """``loss`` for a loss weighting, else the gradient level (``param`` or ``rep``) of a Config."""
    return cfg.balancer.level if is_gradient_method(cfg.balancer.name) else "loss"


def fmt(x: float, digits: int = 2) -> str:
    return "NaN" if not math.isfinite(x) else f"{x:.{digits}f}"


def make_table(baseline_runs: dict[str, list[dict]], method_runs: dict[str, list[dict]],
               levels: dict[str, str]) -> str:
    """Markdown table: one row for the single-task baselines, then one per method.

    ``baseline_runs``: task -> that task's STL metrics.json dicts (one per seed);
    ``method_runs``: method -> its metrics.json dicts (one per finished seed, empty if all failed).
    """
    base = {}
    for task, runs in baseline_runs.items():
        base.update(mean_over_seeds(runs, [k for k in METRICS if k.startswith(task + "/")]))
    head = ["method", "level", "seg mIoU ↑", "depth abs_err ↓", "normal mean ↓", "Δm % ↓", "step ms/it"]
    row = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
    value = lambda metrics, k: fmt(metrics[k], 3 if k.startswith("depth") else 2)  # noqa: E731
    lines = [row(head), "|" + "---|" * len(head),
             row(["single-task", "—", *(value(base, k) for k in COLUMNS), "0.00", "—"])]
    for name, runs in method_runs.items():
        if not runs:
            lines.append(row([name, levels[name], "failed", "", "", "", ""]))
            continue
        res = mean_over_seeds(runs, METRICS)
        dm = fmt(safe_delta(res, base))
        if len(runs) > 1:  # spread of the per-seed Δm against the seed-mean baselines
            per_seed = [safe_delta(r["final"], base) for r in runs]
            dm += " ± " + fmt(statistics.stdev(per_seed) if all(map(math.isfinite, per_seed)) else math.nan)
        step = [r["step_ms_per_iter"] for r in runs if "step_ms_per_iter" in r]
        cells = [name, levels[name], *(value(res, k) for k in COLUMNS), dm,
                 f"{statistics.fmean(step):.0f}" if step else "—"]
        lines.append(row(cells))
    return "\n".join(lines) + "\n"


@exit_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="folder of the runs and table.md")
    parser.add_argument("--iters", type=int, help="train.max_iters (and the eval/checkpoint interval)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", help="balancing config names or YAML paths (default: all)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides for every run (anywhere on the line)")
    argv = sys.argv[1:] if argv is None else list(argv)
    # key=value words are overrides wherever they stand (argparse would feed them to --seeds/--methods)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = parser.parse_args([a for a in argv if a not in overrides])

    methods = args.methods or sorted(p.stem for p in (CONFIGS / "balancing").glob("*.yaml"))
    configs = {Path(m).stem: method_config(m) for m in methods}
    shared = overrides
    if args.iters:  # before the user's overrides, which win
        shared = [f"train.max_iters={args.iters}", f"train.eval_interval={args.iters}",
                  f"train.checkpoint_interval={args.iters}", *shared]
    # Load every config once up front, so a bad override fails here and not in 20 subprocesses.
    loaded = {n: load_config(c, overrides_for(c, shared)) for n, c in {**configs, **BASELINES}.items()}
    t0 = time.perf_counter()

    def runs(name: str, config: Path) -> list[dict]:
        out = [train(config, args.out / name / f"seed{s}", [*shared, f"seed={s}"]) for s in args.seeds]
        return [r for r in out if r is not None]

    baseline_runs = {task: runs(cfg.stem, cfg) for task, cfg in BASELINES.items()}
    if not all(baseline_runs.values()):
        print("error: a single-task baseline failed to train; see its stdout.log", file=sys.stderr)
        return 1
    method_runs = {name: runs(name, cfg) for name, cfg in configs.items()}

    cfg = loaded[next(iter(configs))]
    note = (f"Synthetic scenes, {cfg.train.max_iters} iterations, seed(s) {' '.join(map(str, args.seeds))}, "
            f"{cfg.data.size[0]}x{cfg.data.size[1]} images, batch {cfg.data.batch_size}, "
            f"{cfg.model.backbone['name']}. Final validation metrics ({cfg.data.num_val} images); Δm over "
            f"{', '.join(METRICS)} against the single-task models (lower is better).\n"
            f"Overrides: {' '.join(overrides) or 'none'}.\n\n")
    table = note + make_table(baseline_runs, method_runs, {n: level(loaded[n]) for n in configs})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table)
    print(table + f"\n(wrote {args.out / 'table.md'}; {time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
