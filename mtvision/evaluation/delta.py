"""Δm: the mean relative change of a multi-task model's metrics against single-task baselines.

Convention of Nash-MTL (Navon et al., 2022) and FAMO (Liu et al., 2023): LOWER is better. For each
baseline metric ``k`` with value ``B_k`` and the model's value ``M_k``

    term_k = (M_k - B_k) / B_k * 100     if lower is better for k (errors)
    term_k = -(M_k - B_k) / B_k * 100    if higher is better for k (IoU, accuracies)

and ``Δm = mean_k term_k``: a model better than its baselines has a negative Δm.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["DELTA_M_METRICS", "delta_m_metrics", "HIGHER_IS_BETTER", "delta_m", "delta_table", "read_baselines", "read_metrics",
           "relative_changes", "read_auxiliary_tasks", "without_tasks"]

#: The metrics Δm is taken over when a baseline is a whole metrics file (the NYUv2 / Cityscapes convention
#: of MTAN, Nash-MTL and FAMO): segmentation mIoU and pixel accuracy, depth absolute and relative error,
#: normal mean / median angle and the three within-angle percentages — those a baseline reports; and
#: for detection its COCO box AP (AP@[.5:.95]).
DELTA_M_METRICS = ("seg/mIoU", "seg/pixAcc", "depth/abs_err", "depth/rel_err", "normal/mean", "normal/median",
                   "normal/within_11.25", "normal/within_22.5", "normal/within_30", "det/AP")

#: Direction of every scalar metric name the evaluation metrics produce (the last component of a
#: ``"task/metric"`` key): True where a larger value is better.
HIGHER_IS_BETTER: dict[str, bool] = {
    # SegmentationMetric
    "mIoU": True,
    "pixAcc": True,
    # DepthMetric
    "abs_err": False,
    "rel_err": False,
    "rmse": False,  # also NormalMetric's rmse (degrees)
    "log10": False,
    "delta1": True,
    "delta2": True,
    "delta3": True,
    # NormalMetric
    "mean": False,
    "median": False,
    "within_11.25": True,
    "within_22.5": True,
    "within_30": True,
    # DetectionMetric (COCO AP)
    "AP": True,
    "AP50": True,
    "AP75": True,
    "APs": True,
    "APm": True,
    "APl": True,
}


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def delta_m_metrics() -> tuple[str, ...]:
    """``DELTA_M_METRICS`` (the built-in tasks take theirs from it) and the Δm metrics of every other
    registered task (``Task.delta_metrics``)."""
    from ..registry import TASKS

    keys = list(DELTA_M_METRICS)
    for name in TASKS:
        keys += [f"{name}/{m}" for m in TASKS[name].delta_metrics if f"{name}/{m}" not in keys]
    return tuple(keys)


def _direction(key: str, higher_is_better: Mapping[str, bool] | None) -> bool:
    from ..tasks import metric_direction

    name = key.rsplit("/", 1)[-1]
    for k in (key, name):
        if k in (higher_is_better or {}):
            return bool(higher_is_better[k])
    registered = metric_direction(key)  # the task's own table (a plugin task's metrics too)
    if registered is not None:
        return registered
    for k in (key, name):
        if k in HIGHER_IS_BETTER:
            return bool(HIGHER_IS_BETTER[k])
    raise ValueError(
        f"delta_m: no direction known for metric {key!r}; pass higher_is_better={{{key!r}: True|False}} "
        f"(known names: {sorted(HIGHER_IS_BETTER)})"
    )


def _number(value, what: str, key: str) -> float:
    bad = isinstance(value, (bool, str, bytes))
    try:
        x = float(value)
    except (TypeError, ValueError, RuntimeError):
        bad = True
    if bad:
        raise ValueError(f"delta_m: {what}[{key!r}] must be a number, got {type(value).__name__}")
    if not math.isfinite(x):
        raise ValueError(f"delta_m: {what}[{key!r}] is {x} (was the metric computed on an empty set?)")
    return x


def relative_changes(
    results: Mapping,
    baselines: Mapping,
    higher_is_better: Mapping[str, bool] | None = None,
) -> dict[str, float]:
    """Per-metric signed relative change in percent, one entry per baseline key (lower is better).

    ``results`` and ``baselines`` map flat ``"task/metric"`` keys (e.g. ``"seg/mIoU"``,
    ``"depth/abs_err"``) to numbers; nested ``{"seg": {"mIoU": ...}}`` dicts are flattened with ``/``.
    Only the baseline's keys are used; extra result keys are ignored. The direction of a key is looked
    up in ``higher_is_better`` by full key, then by its last ``/`` component, then in
    ``HIGHER_IS_BETTER`` by the same two names. Raises ValueError naming the key for a key missing from
    ``results``, a zero, non-finite or non-numeric value, or an unknown direction.
    """
    res = _flatten(results)
    base = _flatten(baselines)
    if not base:
        raise ValueError("delta_m: baselines is empty")
    out = {}
    for key, b in base.items():
        if key not in res:
            raise ValueError(f"delta_m: metric {key!r} is in baselines but missing from results")
        b = _number(b, "baselines", key)
        m = _number(res[key], "results", key)
        if b == 0.0:
            raise ValueError(f"delta_m: baseline for {key!r} is 0; the relative change is undefined")
        change = (m - b) / b * 100.0
        out[key] = -change if _direction(key, higher_is_better) else change
    return out


def delta_m(
    results: Mapping,
    baselines: Mapping,
    higher_is_better: Mapping[str, bool] | None = None,
) -> float:
    """Δm in percent: mean of ``relative_changes(results, baselines, higher_is_better)``; lower is better."""
    terms = relative_changes(results, baselines, higher_is_better)
    return sum(terms.values()) / len(terms)


# ---------------------------------------------------------------------------------------------------
# Metrics files (tools/delta.py, tools/eval.py --baselines).


def _load(path) -> tuple[dict, bool]:
    """``(flat metrics, is_run_file)`` of a JSON file: the ``"final"`` of a tools/train.py
    ``metrics.json``, the ``"metrics"`` of a tools/eval.py ``--out`` file, else the whole object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a JSON object of metrics, got {type(data).__name__}")
    for key in ("final", "metrics"):
        if isinstance(data.get(key), Mapping):
            return _flatten(data[key]), True
    return _flatten(data), False


def read_metrics(path) -> dict:
    """Flat ``{"task/metric": value}`` of a metrics file: a tools/train.py ``metrics.json`` (its
    ``"final"`` evaluation), a tools/eval.py ``--out`` file (its ``"metrics"``), or a plain JSON object
    ``{"seg/mIoU": 53.9, ...}`` (nested ``{"seg": {"mIoU": ...}}`` is flattened with ``/``).
    Values may be null (NaN in the run)."""
    return _load(path)[0]


def read_auxiliary_tasks(path) -> list[str]:
    """The ``train.auxiliary_tasks`` a tools/train.py ``metrics.json`` records (trained, but left out of
    the score and of Δm); empty for any other metrics file."""
    data = json.loads(Path(path).read_text())
    aux = data.get("auxiliary_tasks") if isinstance(data, Mapping) else None
    return [str(t) for t in aux] if isinstance(aux, list) else []


def without_tasks(metrics: Mapping, tasks: Sequence[str]) -> dict:
    """``metrics`` (flat ``"task/metric"`` keys) without the keys of ``tasks``: the auxiliary tasks that Δm
    leaves out."""
    drop = set(tasks)
    return {k: v for k, v in _flatten(metrics).items() if k.split("/", 1)[0] not in drop}


def read_baselines(paths: Sequence, metrics: Sequence[str] | None = None) -> dict[str, float]:
    """The single-task baselines of Δm, merged from one or more metrics files.

    A plain JSON object (e.g. ``{"seg/mIoU": 53.9, "depth/abs_err": 0.38}``, published numbers) gives
    every key it lists. A train ``metrics.json`` or eval ``--out`` file (one per single-task run) gives the
    ``DELTA_M_METRICS`` it reports, so per-class IoUs and the like stay out. ``metrics`` (dotted keys)
    overrides the selection: each is taken from the file(s) that have it. A key given by two files with
    different values, a ``metrics`` key no file has, or a file giving nothing (without ``metrics``) raises
    ValueError naming the file(s).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ValueError("read_baselines: no baseline file given")
    merged: dict = {}
    origin: dict = {}
    for path in paths:
        values, run_file = _load(path)
        if metrics is not None:
            keys = [k for k in metrics if k in values]
        elif run_file:
            keys = [k for k in delta_m_metrics() if k in values]
        else:
            keys = list(values)
        if not keys and metrics is None:
            wanted = list(delta_m_metrics()) if run_file else "(an empty object)"
            raise ValueError(f"{path}: none of the metrics {wanted} is in this baseline file")
        for k in keys:
            if k in merged and merged[k] != values[k]:
                raise ValueError(f"baseline {k!r} differs between {origin[k]} ({merged[k]}) and {path} "
                                 f"({values[k]})")
            merged[k], origin[k] = values[k], path
    missing = [k for k in (metrics or ()) if k not in merged]
    if missing:
        raise ValueError(f"baseline metric(s) {missing} not found in {', '.join(map(str, paths))}")
    return merged


def _fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "NaN"
    return f"{x:.{digits}g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def delta_table(results: Mapping[str, Mapping], baselines: Mapping,
                higher_is_better: Mapping[str, bool] | None = None) -> str:
    """Markdown table of Δm: a row for the baselines, then one per ``name -> results`` entry.

    Columns: each baseline metric (↑ higher / ↓ lower is better) as ``value (term)``, the term being
    the metric's signed relative change in percent as it enters Δm (negative = better than the baseline),
    then Δm. A result whose Δm cannot be computed (missing or non-finite metric) shows why in its Δm cell.
    A line under the table says how to read the cells.
    """
    base = _flatten(baselines)
    arrow = {k: "↑" if _direction(k, higher_is_better) else "↓" for k in base}
    head = ["results", *(f"{k} {arrow[k]}" for k in base), "Δm % ↓"]
    row = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
    lines = [row(head), "|" + "---|" * len(head),
             row(["baselines", *(_fmt(v) for v in base.values()), "0.00"])]
    for name, res in results.items():
        res = _flatten(res)
        try:
            terms = relative_changes(res, base, higher_is_better)
            cells = [f"{_fmt(res[k])} ({terms[k]:+.2f})" for k in base]
            dm = f"{sum(terms.values()) / len(terms):+.2f}"
        except ValueError as e:
            cells = [_fmt(res.get(k, "—")) for k in base]
            dm = f"n/a ({str(e).removeprefix('delta_m: ')})"
        lines.append(row([str(name), *cells, dm]))
    lines += ["", "Cells: value (relative change in %, signed as in Δm: negative = better than the "
                  "baseline)."]
    return "\n".join(lines) + "\n"
