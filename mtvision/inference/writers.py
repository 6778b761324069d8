"""The files ``tools/predict.py --input`` writes per image, from a :class:`~mtvision.inference.Predictor`'s
predictions (at the image's own size):

- ``<stem>_seg.png``: class ids (8-bit for up to 256 classes, else 16-bit);
- ``<stem>_depth.png``: 16-bit millimetres, 0 = invalid (the convention of the custom-dataset folders,
  so ``mtvision.data.dense_io.read_depth`` reads it back); ``<stem>_depth.npy`` float32 metres on request;
- ``<stem>_normal.png``: ``(n + 1) / 2 * 255`` RGB (the custom-dataset normal convention);
- ``<stem>_det.json``: ``{"image", "size": [H, W], "boxes": [[x1, y1, x2, y2], ...] (pixels), "scores",
  "labels", "class_names"}`` (one name per detection);
- ``<stem>_vis.png``: the input with its boxes, the segmentation over the input, the depth and the
  normals side by side, captioned (shrunk to at most ``vis_height`` pixels high).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np

from ..engine.visualize import (DRAW_SCORE_THRESHOLD, colorize_depth, colorize_normal, colorize_seg,
                                draw_boxes, labelled_row, write_png)

__all__ = ["depth_to_png", "prediction_picture", "write_predictions"]

#: Depth PNG value per metre (millimetres, as the custom-dataset folders store depth).
DEPTH_SCALE = 1000.0


def depth_to_png(depth: np.ndarray, scale: float = DEPTH_SCALE) -> np.ndarray:
    """Metres ``[H, W]`` -> ``uint16`` ``round(depth * scale)``, 0 = invalid (a depth <= 0 or not finite); a
    positive depth under half a millimetre is written as 1, one beyond 65.535 m as 65535."""
    d = np.asarray(depth, dtype=np.float64)
    valid = np.isfinite(d) & (d > 0)
    out = np.zeros(d.shape, np.uint16)
    out[valid] = np.clip(np.rint(d[valid] * scale), 1, 65535).astype(np.uint16)
    return out


def _write(path: Path, array: np.ndarray) -> Path:
    if not cv2.imwrite(str(path), array):
        raise OSError(f"cannot write {path}")
    return path


def _class_name(label: int, class_names: Optional[Sequence[str]]) -> str:
    return str(class_names[label]) if class_names and 0 <= label < len(class_names) else str(label)


def prediction_picture(image: np.ndarray, pred: Mapping[str, Any], kinds: Mapping[str, Optional[str]],
                       vis_height: Optional[int] = 480) -> np.ndarray:
    """One RGB picture of an image's predictions: ``input`` (with the boxes scoring at least 0.3, in their
    class's colour), then per dense task its colour-coded map (segmentation blended over the input), side
    by side under captions; shrunk to ``vis_height`` pixels high when the image is taller."""
    rgb = np.ascontiguousarray(image if image.dtype == np.uint8 else
                               (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    h, w = rgb.shape[:2]
    s = min(1.0, vis_height / h) if vis_height else 1.0
    size = (max(1, round(w * s)), max(1, round(h * s)))

    def small(x: np.ndarray, nearest: bool = False) -> np.ndarray:
        if s == 1.0:
            return x
        return cv2.resize(x, size, interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)

    base = small(rgb)
    panels = []
    for task, kind in kinds.items():
        if task not in pred or kind not in ("seg", "depth", "normal"):
            continue
        if kind == "seg":
            colours = colorize_seg(small(pred[task], nearest=True))
            panels.append((task, ((base.astype(np.uint16) + colours) // 2).astype(np.uint8)))
        elif kind == "depth":
            panels.append((task, colorize_depth(small(pred[task]))))
        else:
            panels.append((task, colorize_normal(small(pred[task]).transpose(2, 0, 1))))
    shown = base
    for task, kind in kinds.items():
        if kind == "det" and task in pred:
            det = pred[task]
            keep = det["scores"] >= DRAW_SCORE_THRESHOLD
            shown = draw_boxes(shown, det["boxes"][keep] * s, det["labels"][keep], det["scores"][keep])
    return labelled_row([("input", shown), *panels])


def write_predictions(pred: Mapping[str, Any], image: np.ndarray, out_dir, stem: str, *,
                      kinds: Mapping[str, Optional[str]], class_names: Optional[Sequence[str]] = None,
                      source: Optional[str] = None, depth_npy: bool = False, vis: bool = True,
                      vis_height: Optional[int] = 480) -> list[Path]:
    """Write the files of one image's predictions (module doc) to ``out_dir``; returns their paths.
    ``pred``: a :class:`~mtvision.inference.Predictor` result; ``image``: the input (RGB); ``kinds``:
    ``predictor.kinds``; ``source``: the image's path, recorded in the JSON."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task, kind in kinds.items():
        if task not in pred or kind is None:
            continue
        value = pred[task]
        if kind == "seg":
            ids = value if value.dtype == np.uint8 else value.astype(np.uint16)
            written.append(_write(out / f"{stem}_{task}.png", ids))
        elif kind == "depth":
            written.append(_write(out / f"{stem}_{task}.png", depth_to_png(value)))
            if depth_npy:
                np.save(out / f"{stem}_{task}.npy", value.astype(np.float32))
                written.append(out / f"{stem}_{task}.npy")
        elif kind == "normal":
            path = out / f"{stem}_{task}.png"
            write_png(path, colorize_normal(value.transpose(2, 0, 1)))
            written.append(path)
        elif kind == "det":
            labels = [int(v) for v in value["labels"]]
            doc = {"image": source, "size": [int(image.shape[0]), int(image.shape[1])],
                   "boxes": [[float(c) for c in b] for b in value["boxes"]],
                   "scores": [float(v) for v in value["scores"]], "labels": labels,
                   "class_names": [_class_name(v, class_names) for v in labels]}
            path = out / f"{stem}_{task}.json"
            path.write_text(json.dumps(doc, indent=1))
            written.append(path)
    if vis:
        path = out / f"{stem}_vis.png"
        write_png(path, prediction_picture(image, pred, kinds, vis_height))
        written.append(path)
    return written
