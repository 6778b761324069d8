"""File readers for the datasets: each returns a numpy array or raises ``DataError`` naming the file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import cv2
import numpy as np

from .sample import DataError

__all__ = ["read_image", "read_label_png", "read_npy", "read_json"]

PathLike = Union[str, os.PathLike]


def _exists(path: Path, field: str) -> None:
    if not path.is_file():
        raise DataError(path, field, "file not found")


def read_image(path: PathLike, field: str = "image") -> np.ndarray:
    """An RGB ``uint8 [H, W, 3]`` image (any format OpenCV decodes; grey and RGBA converted)."""
    path = Path(path)
    _exists(path, field)
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(path, field, "cannot decode the image (corrupt or not an image file)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_label_png(path: PathLike, field: str) -> np.ndarray:
    """A single-channel label image ``[H, W]`` with its stored bit depth (8-bit ids, 16-bit depth, ...)."""
    path = Path(path)
    _exists(path, field)
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(path, field, "cannot decode the image (corrupt or not an image file)")
    if img.ndim == 3:
        # palette PNGs decode to identical channels; a truly coloured label map is an error
        if img.shape[2] >= 3 and not (np.array_equal(img[..., 0], img[..., 1])
                                     and np.array_equal(img[..., 1], img[..., 2])):
            raise DataError(path, field, f"expected a single-channel label image, got {img.shape[2]} channels")
        img = img[..., 0]
    return img


def read_npy(path: PathLike, field: str) -> np.ndarray:
    """A ``.npy`` array (no pickled objects)."""
    path = Path(path)
    _exists(path, field)
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(path, field, f"cannot read the .npy array ({e})") from e


def read_json(path: PathLike, field: str) -> dict:
    """A JSON object."""
    import json

    path = Path(path)
    _exists(path, field)
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise DataError(path, field, f"cannot read the JSON file ({e})") from e
    if not isinstance(data, dict):
        raise DataError(path, field, f"expected a JSON object, got {type(data).__name__}")
    return data
