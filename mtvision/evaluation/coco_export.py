"""COCO detections in the official results format, and the official box evaluation on the original
annotation file.

``DetectionMetric`` scores boxes at the network's input size, against the boxes the data pipeline
kept (crowd regions dropped). The official protocol differs: boxes in the *original* image's pixel
coordinates, COCO category ids, crowd annotations kept (a detection matching one is ignored, not a
false positive) and the annotation file's own ``area`` for the small / medium / large ranges.
:class:`CocoResultsExporter` maps every decoded detection back through the evaluation transform
(``meta["transform"]``: resize, scale, crop, flip; :func:`mtvision.data.transforms.boxes_to_original`)
to the original image and writes the results list
(``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``) that COCO's evaluation server and
``pycocotools`` take; :func:`official_evaluation` runs ``COCOeval`` on it against the annotation file.

``python -m mtvision.evaluation.coco_export ANNOTATION_FILE RESULTS_JSON`` evaluates a written file.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..data.transforms import boxes_to_original
from ..distributed import dist_ready

__all__ = ["CocoResultsExporter", "OFFICIAL_KEYS", "official_evaluation"]

#: ``COCOeval.stats`` in order (percent): AP at IoU .50:.95, .50, .75, AP small / medium / large, then
#: AR with 1, 10, 100 detections per image and AR small / medium / large.
OFFICIAL_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class CocoResultsExporter:
    """Collects decoded detections as official COCO results.

    ``add(detections, metas)``: per image ``{"boxes" [K,4] xyxy network pixels, "scores", "labels"}`` and
    the sample's ``meta`` (``image_id`` and ``transform``, as :class:`~mtvision.data.coco.CocoDetection`
    and the evaluation transform write them); labels become category ids through ``cat_ids``.
    ``results()`` gathers every process's list under torch.distributed; ``write(path)`` writes it.
    """

    def __init__(self, cat_ids: Sequence[int]):
        self.cat_ids = [int(c) for c in cat_ids]
        self._results: list[dict] = []

    def add(self, detections: Sequence[Mapping[str, torch.Tensor]], metas: Sequence[Mapping]) -> None:
        if len(detections) != len(metas):
            raise ValueError(f"CocoResultsExporter.add: {len(detections)} detections but {len(metas)} metas")
        for det, meta in zip(detections, metas):
            if "image_id" not in meta or "transform" not in meta:
                raise ValueError(f"CocoResultsExporter.add: {meta.get('source', 'a sample')}: meta needs "
                                 f"'image_id' and 'transform' (a COCO-format dataset's samples have them)")
            boxes = boxes_to_original(det["boxes"], meta["transform"])
            scores = det["scores"].detach().cpu().double().tolist()
            labels = det["labels"].detach().cpu().tolist()
            for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), scores, labels):
                self._results.append({"image_id": int(meta["image_id"]), "category_id": self.cat_ids[label],
                                      "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})

    def results(self) -> list[dict]:
        """Every process's results (gathered in rank order under torch.distributed)."""
        if not dist_ready():
            return list(self._results)
        parts: list[Optional[list]] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self._results)
        return [r for part in parts for r in part]

    def write(self, path, results: Optional[list[dict]] = None) -> Path:
        """Write ``results`` (default: :meth:`results`) as the COCO results JSON; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.results() if results is None else results))
        return path


def official_evaluation(ann_file, results) -> dict[str, float]:
    """``COCOeval(iouType="bbox")`` of ``results`` (a results list or its JSON file) against the COCO
    annotation file ``ann_file``, over every image of the file: ``OFFICIAL_KEYS`` in percent (NaN where
    pycocotools reports -1). pycocotools' printing is suppressed."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not isinstance(results, list):
        results = json.loads(Path(results).read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        if not results:  # loadRes cannot take an empty list: no detection scores 0 wherever there is a target
            targets = any(not a.get("iscrowd", 0) for a in gt.dataset.get("annotations", []))
            return {k: 0.0 if targets else math.nan for k in OFFICIAL_KEYS}
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: (100.0 * float(v) if v >= 0 else math.nan) for k, v in zip(OFFICIAL_KEYS, ev.stats)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Official COCO box evaluation of a results JSON.")
    parser.add_argument("annotation_file", help="the COCO instances JSON of the evaluated split")
    parser.add_argument("results", help="a results JSON (tools/eval.py --coco-export)")
    args = parser.parse_args(argv)
    for p in (args.annotation_file, args.results):
        if not Path(p).is_file():
            print(f"error: no such file: {p}", file=sys.stderr)
            return 2
    stats = official_evaluation(args.annotation_file, args.results)
    for k, v in stats.items():
        print(f"{k:6s} {v:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
