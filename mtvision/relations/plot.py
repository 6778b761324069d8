"""A T x T task-relation matrix as a picture (TensorBoard and ``tools/task_affinity.py``)."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

__all__ = ["heatmap"]


def _diverging(v: float, limit: float) -> tuple[int, int, int]:
    """RGB: blue for negative, white at 0, red for positive, saturated at ``±limit``."""
    x = float(np.clip(v / limit, -1.0, 1.0)) if limit > 0 and np.isfinite(v) else 0.0
    fade = int(round(255 * (1.0 - abs(x))))
    return (255, fade, fade) if x >= 0 else (fade, fade, 255)


def heatmap(matrix, labels: Sequence[str], title: str = "", limit: float | None = None,
            row_title: str = "", col_title: str = "") -> np.ndarray:
    """``matrix [T,T]`` as an RGB ``uint8 [H,W,3]`` picture with the value in every cell; colours saturate
    at ``±limit`` (default: the largest absolute entry)."""
    m = np.asarray(matrix, dtype=np.float64)
    T = len(labels)
    if m.shape != (T, T):
        raise ValueError(f"heatmap: matrix is {m.shape}, expected ({T}, {T})")
    finite = np.abs(m[np.isfinite(m)])
    limit = float(limit) if limit else (float(finite.max()) if finite.size and finite.max() > 0 else 1.0)
    cell, font, scale = 72, cv2.FONT_HERSHEY_SIMPLEX, 0.45
    left = 16 + max(cv2.getTextSize(s, font, scale, 1)[0][0] for s in labels)
    top = 64
    image = np.full((top + T * cell + 24, left + T * cell + 16, 3), 255, np.uint8)
    cv2.putText(image, title, (8, 20), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    if col_title:
        cv2.putText(image, col_title, (left, 38), font, scale, (80, 80, 80), 1, cv2.LINE_AA)
    for j, name in enumerate(labels):
        cv2.putText(image, name, (left + j * cell + 6, top - 8), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    for i, name in enumerate(labels):
        y = top + i * cell
        cv2.putText(image, name, (8, y + cell // 2 + 5), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
        for j in range(T):
            x = left + j * cell
            cv2.rectangle(image, (x, y), (x + cell - 2, y + cell - 2), _diverging(m[i, j], limit), -1)
            text = f"{m[i, j]:.3g}" if np.isfinite(m[i, j]) else "nan"
            w = cv2.getTextSize(text, font, scale, 1)[0][0]
            cv2.putText(image, text, (x + (cell - w) // 2, y + cell // 2 + 5), font, scale, (0, 0, 0), 1,
                        cv2.LINE_AA)
    if row_title:
        cv2.putText(image, row_title, (8, top + T * cell + 18), font, scale, (80, 80, 80), 1, cv2.LINE_AA)
    return image
