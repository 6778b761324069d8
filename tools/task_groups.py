#!/usr/bin/env python
"""Train every group of tasks and rank the task groupings by Δm, to check a predicted grouping:
``python tools/task_groups.py CONFIG --out DIR [--affinity AFFINITY.json] [--k 2] [key=value ...]``.

``CONFIG`` is a multi-task config; every non-empty subset of its ``data.tasks`` is trained with the
config's model (the heads of those tasks only) through ``tools/train.py`` into ``DIR/seed<k>/<tasks>/``,
once per ``--seeds`` seed (a run
whose ``metrics.json`` exists is not trained again, an interrupted one resumes). A grouping is a set of at
most ``--k`` groups covering the tasks, each task's prediction taken from one of the groups it is in; its
Δm (percent, lower is better) is against the single-task runs (the one-task subsets, averaged over
seeds), over the Δm metrics of every task; with several seeds, the mean and standard deviation of each
seed's Δm. Prints every grouping's Δm (partitions, and the overlapping grouping of
``--affinity``'s ``groupings[k]`` when given: ``tools/task_affinity.py``'s output), best first, marking
the predicted one with every grouping's TAG score (the mean affinity its groups give the tasks) and the
rank correlation of that score with Δm, and writes ``DIR/groupings.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mtvision.config import config_from_dict, config_to_dict, load_config, save_config
from mtvision.engine import write_json
from mtvision.engine.cli import exit_on_user_error
from mtvision.evaluation import delta_m_metrics, read_metrics, relative_changes
from mtvision.relations import group_affinity

ROOT = Path(__file__).resolve().parents[1]


def _name(group) -> str:
    return "+".join(group)


def _partitions(items: list, k: int):
    """Every partition of ``items`` into at most ``k`` non-empty blocks."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest, k):
        for i in range(len(part)):
            yield part[:i] + [[first, *part[i]]] + part[i + 1:]
        if len(part) < k:
            yield [[first], *part]


def train_group(cfg_dict: dict, group: list[str], out: Path, seed_log) -> dict:
    """Train ``group`` (the config's model with those heads) into ``out / name``; its final metrics."""
    work = out / _name(group)
    metrics_file = work / "metrics.json"
    if not metrics_file.is_file():
        raw = json.loads(json.dumps(cfg_dict))
        raw["work_dir"] = str(work)
        raw["data"]["tasks"] = list(group)
        raw["model"]["heads"] = {t: raw["model"]["heads"][t] for t in group}
        raw["train"]["auxiliary_tasks"] = []
        raw["loss"]["weights"] = {t: w for t, w in raw["loss"].get("weights", {}).items() if t in group}
        work.mkdir(parents=True, exist_ok=True)
        config = work.parent / f"{_name(group)}.yaml"
        save_config(config_from_dict(raw, str(config)), config)
        resume = ["--resume"] if (work / "checkpoints" / "last.pth").is_file() else []
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), str(config), "--no-progress",
                               *resume], cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"training {_name(group)} failed (exit {done.returncode}); see "
                               f"{work / 'train.log'}"
                               f"\n{done.stderr[-2000:]}")
        print(f"trained {_name(group)} in {time.perf_counter() - t0:.0f}s", file=seed_log, flush=True)
    return read_metrics(metrics_file)


def _spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    norm = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / norm if norm > 0 else float("nan")


def grouping_delta(grouping: list[list[str]], served_by: dict[str, int], runs: dict,
                   baselines: dict) -> float:
    """Δm of a grouping: each task's Δm metrics from the run of the group serving it."""
    results = {}
    for task, g in served_by.items():
        metrics = runs[_name(grouping[g])]
        results.update({k: v for k, v in metrics.items() if k.split("/", 1)[0] == task})
    terms = relative_changes(results, baselines)
    return sum(terms.values()) / len(terms)


@exit_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("config", help="the multi-task experiment config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--k", type=int, default=2, help="the budget of networks (default 2)")
    parser.add_argument("--affinity", type=Path, help="tools/task_affinity.py's affinity.json")
    parser.add_argument("--seeds", type=int, nargs="+", help="train every group once per seed (default: the "
                        "config's seed); Δm is the mean over seeds, ± their standard deviation")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    tasks = list(cfg.data.tasks)
    seeds = args.seeds or [cfg.seed]
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[int, dict] = {}
    for seed in seeds:
        cfg_dict = config_to_dict(load_config(args.config, [*args.overrides, f"seed={seed}"]))
        runs[seed] = {}
        for size in range(1, len(tasks) + 1):
            for group in itertools.combinations(tasks, size):
                runs[seed][_name(group)] = train_group(cfg_dict, list(group), args.out / f"seed{seed}",
                                                       sys.stderr)
    wanted = [k for k in delta_m_metrics() if k.split("/", 1)[0] in tasks]
    # the single-task models, averaged over seeds: every seed's groupings are compared with them
    baselines = {k: statistics.mean(runs[s][k.split("/", 1)[0]][k] for s in seeds) for k in wanted
                 if k in runs[seeds[0]][k.split("/", 1)[0]]}

    def row(groups, served, predicted):
        per_seed = [grouping_delta(groups, served, runs[s], baselines) for s in seeds]
        return {"groups": groups, "served_by": served, "delta_m": statistics.mean(per_seed),
                "delta_m_std": statistics.stdev(per_seed) if len(seeds) > 1 else 0.0,
                "delta_m_per_seed": per_seed, "predicted": predicted}

    rows = []
    for part in _partitions(tasks, args.k):
        part = [sorted(b, key=tasks.index) for b in part]
        rows.append(row(part, {t: i for i, b in enumerate(part) for t in b}, False))
    correlation = None
    if args.affinity:
        affinity = json.loads(args.affinity.read_text())
        chosen = affinity["groupings"][str(args.k)]
        same = [r for r in rows if sorted(map(tuple, r["groups"])) == sorted(map(tuple, chosen["groups"]))]
        if same:
            same[0]["predicted"] = True
        else:  # overlapping groups: not a partition
            rows.append(row(chosen["groups"], chosen["served_by"], True))
        A, order = torch.tensor(affinity["affinity"], dtype=torch.float64), affinity["tasks"]
        for r in rows:  # TAG's predicted score of every grouping: the mean affinity its groups give
            r["tag_score"] = sum(group_affinity(A, [order.index(x) for x in r["groups"][g]], order.index(t))
                                 for t, g in r["served_by"].items()) / len(tasks)
        correlation = _spearman([r["tag_score"] for r in rows], [-r["delta_m"] for r in rows])
    rows.sort(key=lambda r: r["delta_m"])
    score_head = " TAG score ↑ |" if args.affinity else ""
    print(f"| rank | grouping (k ≤ {args.k}) | Δm % ↓ |{score_head}\n|---|---|---|{'---|' if score_head else ''}")
    for i, r in enumerate(rows, 1):
        groups = " ".join("{" + ", ".join(g) + "}" for g in r["groups"])
        spread = f" ± {r['delta_m_std']:.2f}" if len(seeds) > 1 else ""
        score = f" {r['tag_score']:.3g} |" if args.affinity else ""
        print(f"| {i} | {groups}{' ← predicted' if r['predicted'] else ''} | {r['delta_m']:+.2f}{spread} |{score}")
    if correlation is not None:
        print(f"Spearman rank correlation of the TAG score with -Δm over the {len(rows)} groupings: "
              f"{correlation:+.2f}")
    write_json({"tasks": tasks, "k": args.k, "seeds": seeds, "baselines": baselines, "groupings": rows,
                "spearman_tag_score_vs_delta_m": correlation,
                "runs": {s: {n: {k: v for k, v in m.items() if k in wanted} for n, m in by.items()}
                         for s, by in runs.items()}},
               args.out / "groupings.json")
    print(f"wrote {args.out / 'groupings.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
