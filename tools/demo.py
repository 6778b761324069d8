#!/usr/bin/env python
"""The `make demo` run: train the 3-task ResNet-18 on synthetic scenes, compare with a trivial baseline,
write pictures. ``python tools/demo.py [--config configs/synthetic/demo.yaml] [key=value ...]``.

Prints a table of mIoU, pixAcc, depth abs/rel error and normal mean/median angle for the trained model
and for the trivial baseline (training set's majority class, mean depth and mean normal everywhere),
and writes into the config's work dir: the training outputs, ``pictures/*.png`` (predictions on
validation images) and ``demo_results.json``. Exit status 1 when the model fails to beat the baseline
on one of the table's metrics.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mtvision.config import load_config
from mtvision.engine import Trainer, build_dataloader, trivial_baseline, write_json
from mtvision.engine.cli import exit_on_user_error
from mtvision.engine.logging import format_table
from mtvision.engine.visualize import write_prediction_pngs
from mtvision.evaluation import relative_changes

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthetic" / "demo.yaml"
TABLE = {"seg": ["seg/mIoU", "seg/pixAcc"], "depth": ["depth/abs_err", "depth/rel_err"],
         "normal": ["normal/mean", "normal/median"]}


@exit_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="default: configs/synthetic/demo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--pictures", type=int, default=8, help="validation images to draw (default 8)")
    parser.add_argument("--baseline-batches", type=int, default=25,
                        help="training batches the trivial baseline's statistics come from (default 25)")
    args = parser.parse_intermixed_args(argv)
    t_start = time.perf_counter()
    cfg = load_config(args.config, args.overrides)
    h, w = cfg.data.size
    print(f"training {cfg.model.backbone.get('name')} on {', '.join(cfg.data.tasks)} "
          f"for {cfg.train.max_iters} iterations (batch {cfg.data.batch_size}, {h}x{w}); "
          f"log in {cfg.work_dir}/train.log", flush=True)
    trainer = Trainer(cfg)
    model_metrics = trainer.train()
    t_trained = time.perf_counter()

    tasks = trainer.tasks
    stats_loader = build_dataloader(trainer.train_set, cfg.data.batch_size, cfg.data.num_workers, train=False)
    base_metrics, predictor = trivial_baseline(stats_loader, trainer.val_loader, tasks, cfg.data.num_classes,
                                               cfg.loss.ignore_index, args.baseline_batches)
    rows = [k for t in tasks for k in TABLE.get(t, [])]
    # relative_changes is lower-is-better (Δm convention); the table shows improvement, higher is better.
    changes = relative_changes(model_metrics, {k: base_metrics[k] for k in rows})
    improvement = {k: -v for k, v in changes.items()}
    pictures = write_prediction_pngs(trainer.model, trainer.val_set, trainer.work_dir / "pictures",
                                     args.pictures, mean=cfg.data.mean, std=cfg.data.std,
                                     device=trainer.device, batch_size=cfg.data.batch_size,
                                     autocast=trainer.autocast)
    seconds = time.perf_counter() - t_start

    print()
    print(format_table(rows, {"trivial baseline": base_metrics,
                              f"model (iter {trainer.iteration})": model_metrics,
                              "improvement %": improvement}))
    described = []
    if predictor.majority_class is not None:
        names = getattr(trainer.train_set, "classes", None)
        name = names[predictor.majority_class] if names else predictor.majority_class
        described.append(f"class {name!r} everywhere")
    if predictor.mean_depth is not None:
        described.append(f"depth {predictor.mean_depth:.3f} m")
    if predictor.mean_normal is not None:
        described.append("normal (" + ", ".join(f"{x:.3f}" for x in predictor.mean_normal) + ")")
    print(f"\ntrivial baseline (statistics of {args.baseline_batches} training batches): "
          + "; ".join(described))
    step_ms = trainer.step_seconds / max(trainer.iteration, 1) * 1e3
    print(f"training {t_trained - t_start:.0f}s ({step_ms:.0f} ms/iter in the step), total {seconds:.0f}s; "
          f"{len(pictures)} pictures in {trainer.work_dir / 'pictures'}")
    write_json({"config": str(args.config), "iterations": trainer.iteration, "model": model_metrics,
                "trivial_baseline": base_metrics, "improvement_percent": improvement,
                "baseline_predictor": vars(predictor), "seconds": seconds, "step_ms_per_iter": step_ms},
               trainer.work_dir / "demo_results.json")
    worse = [k for k in rows if not improvement[k] > 0]
    if worse:
        print(f"the model does NOT beat the trivial baseline on: {', '.join(worse)}")
        return 1
    print(f"the model beats the trivial baseline on every metric (smallest improvement "
          f"{min(improvement.values()):.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
