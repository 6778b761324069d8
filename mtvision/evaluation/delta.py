"""Δm: the mean relative change of a multi-task model's metrics against single-task baselines.

Convention of Nash-MTL (Navon et al., 2022) and FAMO (Liu et al., 2023): LOWER is better. For each
baseline metric ``k`` with value ``B_k`` and the model's value ``M_k``

    term_k = (M_k - B_k) / B_k * 100     if lower is better for k (errors)
    term_k = -(M_k - B_k) / B_k * 100    if higher is better for k (IoU, accuracies)

and ``Δm = mean_k term_k``: a model better than its baselines has a negative Δm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["HIGHER_IS_BETTER", "delta_m", "relative_changes"]

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


def _direction(key: str, higher_is_better: Mapping[str, bool] | None) -> bool:
    name = key.rsplit("/", 1)[-1]
    for table in (higher_is_better or {}, HIGHER_IS_BETTER):
        for k in (key, name):
            if k in table:
                return bool(table[k])
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
