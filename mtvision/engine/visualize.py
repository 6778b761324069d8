"""Pictures of predictions: fixed segmentation palette, depth colour map, normals as RGB, boxes drawn on
the input, labelled rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
from torch import Tensor

__all__ = ["LABEL_HEIGHT", "PALETTE", "colorize_depth", "colorize_normal", "colorize_seg", "denormalize",
           "draw_boxes", "labelled_row", "prediction_panels", "write_png",
           "write_prediction_pngs"]

#: Height in pixels of the caption strip above each panel of ``labelled_row``.
LABEL_HEIGHT = 14
#: Detections drawn in the pictures: those scoring at least this.
DRAW_SCORE_THRESHOLD = 0.3


def _palette() -> np.ndarray:
    # The first colours are chosen for the synthetic classes (floor, wall, ceiling, box, sphere,
    # cylinder); the rest follow the PASCAL VOC bit pattern; 255 (ignore) is black.
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    pal[:6] = [(140, 100, 60), (170, 180, 200), (245, 240, 220), (220, 50, 40), (40, 180, 70), (50, 90, 220)]
    pal[255] = 0
    return pal


#: Fixed RGB colour per class id, ``uint8 [256, 3]``.
PALETTE = _palette()


def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def denormalize(image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised ``[3,H,W]`` image -> RGB ``uint8 [H,W,3]`` (``x * std + mean``, clipped to [0, 1])."""
    x = _np(image).transpose(1, 2, 0) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def colorize_seg(labels) -> np.ndarray:
    """Class map ``[H,W]`` (ids 0..255) -> RGB ``uint8 [H,W,3]`` in ``PALETTE``."""
    return PALETTE[np.clip(_np(labels).astype(np.int64), 0, 255)]


def colorize_depth(depth, vmin: Optional[float] = None, vmax: Optional[float] = None,
                   colormap: int = cv2.COLORMAP_VIRIDIS) -> np.ndarray:
    """Depth ``[H,W]`` or ``[1,H,W]`` metres -> RGB ``uint8 [H,W,3]`` through ``cv2.applyColorMap`` over
    ``[vmin, vmax]`` (default: the valid pixels' range); pixels with depth <= 0 are black."""
    d = _np(depth).reshape(_np(depth).shape[-2:]).astype(np.float32)
    valid = d > 0
    if vmin is None or vmax is None:
        vals = d[valid] if valid.any() else np.zeros(1, np.float32)
        vmin = float(vals.min()) if vmin is None else vmin
        vmax = float(vals.max()) if vmax is None else vmax
    scaled = np.clip((d - vmin) / max(vmax - vmin, 1e-6), 0.0, 1.0)
    bgr = cv2.applyColorMap((scaled * 255.0 + 0.5).astype(np.uint8), colormap)
    rgb = bgr[..., ::-1].copy()
    rgb[~valid] = 0
    return rgb


def colorize_normal(normal) -> np.ndarray:
    """Normals ``[3,H,W]`` (raw; normalised here) -> RGB ``uint8 [H,W,3]`` as ``(n + 1) / 2``; zero
    vectors (invalid) are black."""
    n = _np(normal).astype(np.float32)
    norm = np.sqrt((n * n).sum(0, keepdims=True))
    valid = norm[0] > 0
    n = n / np.maximum(norm, 1e-12)
    rgb = ((n.transpose(1, 2, 0) + 1.0) * 0.5 * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    rgb[~valid] = 0
    return rgb


def draw_boxes(rgb: np.ndarray, boxes, labels, scores=None) -> np.ndarray:
    """A copy of RGB ``uint8 [H,W,3]`` with ``boxes`` ``[N,4]`` (xyxy pixels) outlined in their class's
    ``PALETTE`` colour, and each ``scores`` value (if given) written at the box's corner."""
    out = np.ascontiguousarray(rgb).copy()
    boxes, labels = _np(boxes).reshape(-1, 4), _np(labels).reshape(-1).astype(np.int64)
    scores = None if scores is None else _np(scores).reshape(-1)
    h, w = out.shape[:2]
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        colour = tuple(int(c) for c in PALETTE[int(np.clip(labels[i], 0, 255))])
        p1 = (int(np.clip(round(x1), 0, w - 1)), int(np.clip(round(y1), 0, h - 1)))
        p2 = (int(np.clip(round(x2) - 1, 0, w - 1)), int(np.clip(round(y2) - 1, 0, h - 1)))
        cv2.rectangle(out, p1, p2, colour, 1)
        if scores is not None:
            cv2.putText(out, f"{scores[i]:.2f}", (p1[0] + 1, min(p1[1] + 8, h - 1)), cv2.FONT_HERSHEY_SIMPLEX,
                        0.25, colour, 1, cv2.LINE_AA)
    return out


def labelled_row(panels: Sequence[tuple[str, np.ndarray]]) -> np.ndarray:
    """Panels of equal size ``[H,W,3]`` side by side, each under a ``LABEL_HEIGHT``-pixel caption;
    returns RGB ``uint8 [LABEL_HEIGHT + H, len(panels) * W, 3]``."""
    if not panels:
        raise ValueError("labelled_row: no panels")
    h, w = panels[0][1].shape[:2]
    cols = []
    for label, img in panels:
        if img.shape[:2] != (h, w):
            raise ValueError(f"labelled_row: panel {label!r} is {img.shape[:2]}, expected {(h, w)}")
        strip = np.full((LABEL_HEIGHT, w, 3), 255, np.uint8)
        cv2.putText(strip, label, (2, LABEL_HEIGHT - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (0, 0, 0), 1,
                    cv2.LINE_AA)
        cols.append(np.concatenate([strip, img], axis=0))
    return np.concatenate(cols, axis=1)


def prediction_panels(image: Tensor, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor],
                      mean: Sequence[float], std: Sequence[float]) -> list[tuple[str, np.ndarray]]:
    """Panels for one sample: the input, then per task present in ``outputs`` the prediction and (when
    in ``targets``) the ground truth. ``image [3,H,W]``; ``outputs``/``targets`` per task without the batch
    dimension (``seg`` logits ``[C,H,W]`` / labels ``[H,W]``, ``depth [1,H,W]``, ``normal [3,H,W]``, ``det``
    decoded ``{"boxes", "scores", "labels"}`` / ``{"boxes", "labels"}``, drawn on the input; detections
    scoring below ``DRAW_SCORE_THRESHOLD`` are left out). Predicted and true depth share the colour range
    of the true depth."""
    panels = [("input", denormalize(image, mean, std))]
    if "seg" in outputs:
        panels.append(("seg pred", colorize_seg(outputs["seg"].argmax(0))))
        if "seg" in targets:
            panels.append(("seg true", colorize_seg(targets["seg"])))
    if "depth" in outputs:
        ref = targets.get("depth", outputs["depth"])
        valid = ref > 0
        vmin, vmax = (float(ref[valid].min()), float(ref[valid].max())) if bool(valid.any()) else (None, None)
        panels.append(("depth pred", colorize_depth(outputs["depth"], vmin, vmax)))
        if "depth" in targets:
            panels.append(("depth true", colorize_depth(targets["depth"], vmin, vmax)))
    if "normal" in outputs:
        panels.append(("normal pred", colorize_normal(outputs["normal"])))
        if "normal" in targets:
            panels.append(("normal true", colorize_normal(targets["normal"])))
    if "det" in outputs:
        rgb, det = panels[0][1], outputs["det"]
        keep = _np(det["scores"]) >= DRAW_SCORE_THRESHOLD
        panels.append(("det pred", draw_boxes(rgb, _np(det["boxes"])[keep], _np(det["labels"])[keep],
                                              _np(det["scores"])[keep])))
        if "det" in targets:
            panels.append(("det true", draw_boxes(rgb, targets["det"]["boxes"], targets["det"]["labels"])))
    return panels


def write_png(path, rgb: np.ndarray) -> None:
    """Save an RGB ``uint8 [H,W,3]`` image as PNG (parents created); raises OSError if it cannot."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1])):
        raise OSError(f"cannot write {path}")


def write_prediction_pngs(model, dataset, out_dir, num: int, *, mean: Sequence[float], std: Sequence[float],
                          device="cpu", batch_size: int = 8, autocast=None) -> list[Path]:
    """Predict the first ``num`` samples of ``dataset`` and write one PNG per sample to ``out_dir``
    (``<index:04d>.png``): the ``labelled_row`` of ``prediction_panels``. Returns the paths written."""
    import contextlib

    import torch

    from ..data import collate_samples

    ctx = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    paths = []
    try:
        num = min(int(num), len(dataset))
        for start in range(0, num, batch_size):
            batch = collate_samples([dataset[i] for i in range(start, min(start + batch_size, num))])
            with torch.no_grad(), ctx():
                out = model(batch["image"].to(device))
            detections = None
            if "det" in out:
                detections = model.heads["det"].predict(out.pop("det"), batch["image"].shape[-2:])
            for j in range(batch["image"].shape[0]):
                outputs = {t: v[j].float().cpu() for t, v in out.items()}
                targets = {t: batch[t][j] for t in outputs if t in batch}
                if detections is not None:
                    outputs["det"] = {k: v.cpu() for k, v in detections[j].items()}
                    if "boxes" in batch:
                        targets["det"] = {"boxes": batch["boxes"][j], "labels": batch["labels"][j]}
                row = labelled_row(prediction_panels(batch["image"][j], outputs, targets, mean, std))
                path = Path(out_dir) / f"{start + j:04d}.png"
                write_png(path, row)
                paths.append(path)
    finally:
        model.train(was_training)
    return paths
