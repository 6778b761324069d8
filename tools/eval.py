#!/usr/bin/env python
"""Evaluate a checkpoint on the validation split:
``python tools/eval.py [CONFIG] --checkpoint PATH [--out FILE] [--baselines FILE ...]
[--cityscapes-export DIR] [--coco-export FILE] [key=value ...]`` (or under ``torchrun --nproc_per_node=N``:
each process evaluates its share, the metrics are pooled over the whole set and rank 0 prints and writes
them).

Prints a table of every metric and, with ``--out``, writes ``{"checkpoint", "iteration", "metrics"}`` as
JSON (metrics flat, ``"task/metric"``). The metrics are computed at the run's ``data.size`` (the one stored
in the checkpoint unless ``data.size=...`` is given).

``--baselines FILE ...``: also print Δm (percent, lower is better; Nash-MTL / FAMO convention) and each
metric's relative change against single-task results: ``metrics.json`` files of tools/train.py,
``--out`` files of this tool (their standard Δm metrics: seg mIoU/pixAcc, depth abs/rel err, normal angles),
or plain JSON objects ``{"seg/mIoU": 53.9, "depth/abs_err": 0.38}`` (every key they list). A task of the run
without any baseline metric is named in a warning (Δm leaves it out). With ``--out``, ``delta_m`` and
``relative_changes`` are written too.

``--coco-export FILE`` (COCO-format datasets with the det task): writes the detections as an official COCO
results JSON (boxes mapped back to the original images, category ids) and prints the official
``COCOeval`` numbers against the split's annotation file (crowd regions ignored, the file's areas),
which ``det/AP`` at ``data.size`` only approximates; with ``--out`` they are written as ``coco_official``.

``--cityscapes-export DIR`` (19-class Cityscapes configs): writes every validation prediction as an
official result PNG, ``DIR/{city}_{seq}_{frame}_pred.png`` of label ids at the image's original size
(logits resized bilinearly, then argmax), for cityscapesscripts' ``evalPixelLevelSemanticLabeling``
(``python -m mtvision.evaluation.cityscapes_export CITYSCAPES_ROOT DIR`` runs it).
"""

from __future__ import annotations

import sys
from pathlib import Path


from mtvision.config import ConfigError
from mtvision.engine import autocast_context, evaluate_model, write_json
from mtvision.engine.cli import (checkpoint_tool_parser, config_from_args, exit_on_user_error,
                                 load_trained_model, tasks_without_baseline, val_loader)
from mtvision.engine.builders import resolve_device
from mtvision.distributed import close_process_group, dist_env, init_distributed
from mtvision.engine.logging import format_table
from mtvision.evaluation import read_baselines, relative_changes, without_tasks


def check_cityscapes_export(cfg) -> None:
    """ConfigError unless ``cfg`` evaluates 19-class Cityscapes segmentation (what the official script
    scores)."""
    if cfg.data.dataset != "cityscapes":
        raise ConfigError(f"--cityscapes-export: needs data.dataset=cityscapes, got {cfg.data.dataset!r}")
    if "seg" not in cfg.data.tasks:
        raise ConfigError(f"--cityscapes-export: needs the seg task in data.tasks, "
                          f"got {list(cfg.data.tasks)}")
    if cfg.data.keep_ratio:
        raise ConfigError("--cityscapes-export: the result PNGs are the logits resized to the whole image; "
                          "with data.keep_ratio the logits hold padding: set data.keep_ratio=false")
    if cfg.data.num_classes != 19:
        raise ConfigError(f"--cityscapes-export: the official evaluation scores the 19 train-id classes; "
                          f"data.num_classes is {cfg.data.num_classes} (the 7-category set has no official "
                          f"label-id export)")


def check_coco_export(cfg) -> None:
    """ConfigError unless ``cfg`` evaluates detection on a COCO-format dataset (whose annotation file the
    official evaluation reads)."""
    if cfg.data.dataset != "coco":
        raise ConfigError(f"--coco-export: needs data.dataset=coco, got {cfg.data.dataset!r}")
    if "det" not in cfg.data.tasks:
        raise ConfigError(f"--coco-export: needs the det task in data.tasks, got {list(cfg.data.tasks)}")


def print_delta(metrics: dict, baselines: dict, source: str) -> dict:
    """Print Δm and the per-metric relative changes; returns ``{"delta_m", "relative_changes"}``."""
    terms = relative_changes(metrics, baselines)
    dm = sum(terms.values()) / len(terms)
    print()
    print(format_table(list(terms), {"result": metrics, "baseline": baselines, "change % (Δm sign)": terms}))
    print(f"Δm = {dm:+.2f} % against {source} (mean of the changes; negative = better than the baselines)")
    return {"delta_m": dm, "relative_changes": terms}


@exit_on_user_error
def main(argv=None) -> int:
    try:
        return _main(argv)
    finally:
        close_process_group()


def _main(argv=None) -> int:
    parser = checkpoint_tool_parser(__doc__)
    parser.add_argument("--out", help="write the metrics to this JSON file")
    parser.add_argument("--baselines", nargs="+", metavar="FILE",
                        help="single-task metrics file(s): print Δm against them")
    parser.add_argument("--cityscapes-export", metavar="DIR",
                        help="write official Cityscapes result PNGs (label ids, full resolution) into DIR")
    parser.add_argument("--coco-export", metavar="FILE",
                        help="write the detections as an official COCO results JSON (original image "
                             "coordinates) and run the official COCO evaluation on it")
    args = parser.parse_intermixed_args(argv)
    cfg = config_from_args(args)
    baselines = None
    if args.baselines:  # read before the (long) evaluation, so a bad file fails fast
        try:
            baselines = read_baselines(args.baselines)
        except ValueError as e:
            raise ConfigError(f"--baselines: {e}") from None
    if args.cityscapes_export:
        check_cityscapes_export(cfg)
    if args.coco_export:
        check_coco_export(cfg)
    # under torchrun every process evaluates its share of the set (a single process otherwise)
    init_distributed(resolve_device(cfg.train.device).type)
    model, state, device = load_trained_model(cfg, args.checkpoint)
    dataset, loader = val_loader(cfg)
    on_batch = None
    if args.cityscapes_export:
        from mtvision.evaluation.cityscapes_export import CityscapesExporter

        exporter = CityscapesExporter(args.cityscapes_export, cfg.data.num_classes)
        on_batch = lambda batch, out: exporter.add(out["seg"], batch["meta"])  # noqa: E731
    coco_exporter = None
    if args.coco_export:
        from mtvision.evaluation.coco_export import CocoResultsExporter, official_evaluation

        coco_exporter = CocoResultsExporter(dataset.cat_ids)

        def on_batch(batch, out):  # out["det"]: the boxes the metric scores, decoded once for both
            coco_exporter.add(out["det"], batch["meta"])
    metrics = evaluate_model(model, loader, list(cfg.data.tasks), cfg.data.num_classes,
                             cfg.loss.ignore_index, device, autocast_context(cfg.train.amp, device),
                             getattr(dataset, "classes", None), on_batch=on_batch)
    coco_results = coco_exporter.results() if coco_exporter is not None else None  # every process's share
    if not dist_env().is_main:  # under torchrun: the metrics are pooled over all processes; rank 0 reports
        return 0
    title = f"{Path(args.checkpoint).name} (iter {state.get('iteration')})"
    print(format_table(list(metrics), {title: metrics}))
    summary = {"checkpoint": str(args.checkpoint), "iteration": state.get("iteration"),
               "num_samples": len(dataset), "metrics": metrics}
    rc = 0
    if baselines is not None and cfg.train.auxiliary_tasks:
        print(f"note: auxiliary task(s) {', '.join(cfg.train.auxiliary_tasks)} (train.auxiliary_tasks): "
              f"left out of Δm", file=sys.stderr)
        baselines = without_tasks(baselines, cfg.train.auxiliary_tasks)
        metrics_for_delta = without_tasks(metrics, cfg.train.auxiliary_tasks)
    else:
        metrics_for_delta = metrics
    if baselines is not None:
        main_tasks = [t for t in cfg.data.tasks if t not in cfg.train.auxiliary_tasks]
        for task in tasks_without_baseline(main_tasks, baselines):
            print(f"warning: --baselines: no baseline metric of task {task!r} in {' '.join(args.baselines)}; "
                  f"Δm leaves it out", file=sys.stderr)
        try:
            summary.update(print_delta(metrics_for_delta, baselines, " ".join(args.baselines)))
        except ValueError as e:
            print(f"error: --baselines: {e}", file=sys.stderr)
            rc = 2
    if args.cityscapes_export:
        print(f"wrote {exporter.num_written} Cityscapes result PNGs to {args.cityscapes_export} (official "
              f"evaluation at full resolution: python -m mtvision.evaluation.cityscapes_export "
              f"{cfg.data.root} {args.cityscapes_export}"
              f"{'' if cfg.data.val_split == 'val' else ' --split ' + cfg.data.val_split})")
    if coco_exporter is not None:
        coco_exporter.write(args.coco_export, coco_results)
        official = official_evaluation(dataset.ann_file, coco_results)
        print(f"\nwrote {len(coco_results)} detections to {args.coco_export}; official COCO evaluation "
              f"against {dataset.ann_file} (original image coordinates, crowd regions ignored):")
        print(format_table(list(official), {"official": official}))
        summary["coco_official"] = official
    if args.out:
        write_json(summary, args.out)
        print(f"wrote {args.out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
