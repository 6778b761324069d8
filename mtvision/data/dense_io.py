"""Readers for dense label files (depth maps, surface normals, class-id maps) shared by the file-backed
datasets. Each returns a raw-sample array (``mtvision.data.sample``) or raises ``DataError`` naming the file
and the field.

Encodings:

- depth: 16-bit PNG of ``metres * depth_scale`` (integers, ``0`` = invalid; an 8-bit PNG is refused: it
  cannot hold millimetres beyond 0.255 m), or ``.npy`` float metres ``[H, W]`` / ``[H, W, 1]``
  (``0`` = invalid).
- normals: 8-bit (or 16-bit) RGB PNG of ``(n + 1) / 2 * 255`` (``* 65535``), channels R, G, B = x, y, z of
  the camera frame (x right, y down, z forward); a pixel that is 0 in all three channels is invalid. Or
  ``.npy`` / ``.exr`` float ``[H, W, 3]`` holding ``n`` itself in [-1, 1] (``0`` = invalid). Valid vectors are
  renormalised to unit length.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import cv2
import numpy as np

from .io import read_label_png, read_npy
from .sample import IGNORE_INDEX, DataError

__all__ = ["check_shape", "seg_from_array", "read_depth", "read_normal", "finish_normal", "decode_normal_png",
           "NORMAL_EXTS", "DEPTH_EXTS"]

PathLike = Union[str, os.PathLike]

#: File types tried, in this order, for a depth map / a normal map with a given stem.
DEPTH_EXTS = (".png", ".npy")
NORMAL_EXTS = (".png", ".npy", ".exr")

# A normal shorter than this (after decoding) is treated as invalid rather than blown up to unit length.
_MIN_NORM = 1e-3


def check_shape(arr: np.ndarray, shape: Sequence[int], path: PathLike, field: str, what: str = "the image's"):
    """Raise ``DataError`` unless ``arr.shape == shape``."""
    if tuple(arr.shape) != tuple(shape):
        raise DataError(path, field, f"expected shape {tuple(shape)} ({what}), got {tuple(arr.shape)}")


def seg_from_array(lab: np.ndarray, path: PathLike, num_classes: int, field: str = "seg",
                   extra_ignore: Optional[int] = None) -> np.ndarray:
    """Class ids ``[H, W]`` (uint8 when they fit, else int32) from an integer or integer-valued float array.

    Values must be in ``[0, num_classes)`` or ``255`` (ignore); ``extra_ignore`` (e.g. ``-1``) is mapped
    to 255.
    """
    if lab.ndim == 3 and lab.shape[2] == 1:
        lab = lab[..., 0]
    if lab.ndim != 2:
        raise DataError(path, field, f"expected a 2-D label map [H, W], got shape {tuple(lab.shape)}")
    if lab.dtype.kind == "f":
        if not np.isfinite(lab).all():
            raise DataError(path, field, "label map holds NaN or inf")
        r = np.rint(lab)
        if (r != lab).any():
            raise DataError(path, field, "expected integer class ids, got non-integer values")
        lab = r.astype(np.int32)
    elif lab.dtype.kind not in "iu" and lab.dtype != np.bool_:
        raise DataError(path, field, f"expected integer class ids, got dtype {lab.dtype}")
    ignore = lab == IGNORE_INDEX
    if extra_ignore is not None:
        ignore |= lab == extra_ignore
    bad = ~ignore & ((lab < 0) | (lab >= num_classes))
    if bad.any():
        values = np.unique(lab[bad])[:5].tolist()
        allowed = f"{IGNORE_INDEX}" + (f" or {extra_ignore}" if extra_ignore is not None else "")
        raise DataError(path, field, f"label value(s) {values} out of range: expected 0..{num_classes - 1} "
                                     f"or {allowed} (ignore)")
    out = lab.astype(np.uint8 if num_classes <= IGNORE_INDEX else np.int32)
    if extra_ignore is not None:
        out[ignore] = IGNORE_INDEX
    return out


def _check_depth(depth: np.ndarray, path: PathLike, field: str) -> np.ndarray:
    if depth.ndim == 3 and depth.shape[2] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2:
        raise DataError(path, field,
                        f"expected a depth map [H, W] or [H, W, 1], got shape {tuple(depth.shape)}")
    if depth.dtype.kind not in "fiu":
        raise DataError(path, field, f"expected numbers, got dtype {depth.dtype}")
    depth = depth.astype(np.float32, copy=False)
    if not np.isfinite(depth).all() or (depth < 0).any():
        raise DataError(path, field, "expected finite metres >= 0 (0 = invalid)")
    return depth


def read_depth(path: PathLike, depth_scale: float = 1000.0, field: str = "depth") -> np.ndarray:
    """Depth in metres ``float32 [H, W]`` (0 = invalid) from a 16-bit PNG (``value / depth_scale``; an 8-bit
    PNG is refused) or an ``.npy`` of metres."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        return _check_depth(read_npy(path, field), path, field)
    raw = read_label_png(path, field)
    if raw.dtype == np.uint8:
        raise DataError(path, field, f"8-bit PNG, which holds at most {255 / depth_scale:g} m: depth PNGs must "
                                     f"be 16-bit millimetres (metres * depth_scale {depth_scale:g}, 0 = "
                                     f"invalid); write np.uint16, or an .npy of float metres")
    if raw.dtype.kind not in "iu":
        raise DataError(path, field, f"expected an integer (16-bit) depth PNG, got dtype {raw.dtype}")
    return (raw.astype(np.float32) / np.float32(depth_scale)).astype(np.float32, copy=False)


def finish_normal(n: np.ndarray, path: PathLike, field: str = "normal",
                  invalid: Optional[np.ndarray] = None, inplace: bool = False) -> np.ndarray:
    """``float32 [H, W, 3]`` unit vectors: valid pixels renormalised, ``invalid`` ones (and vectors shorter
    than 1e-3) set to 0. Raises ``DataError`` on a wrong shape or non-finite values. ``inplace``: a
    writable float32 ``n`` (one the caller just read) is overwritten instead of copied."""
    if n.ndim != 3 or n.shape[2] != 3:
        raise DataError(path, field, f"expected a normal map [H, W, 3], got shape {tuple(n.shape)}")
    if n.dtype.kind != "f":
        raise DataError(path, field, f"expected float normals in [-1, 1], got dtype {n.dtype}")
    n = n.astype(np.float32, copy=False)
    # per channel plane: numpy is slow on a trailing axis of 3 (einsum / broadcasting)
    x, y, z = n[..., 0], n[..., 1], n[..., 2]
    sq = x * x + y * y + z * z
    if not np.isfinite(sq).all():
        raise DataError(path, field, "normal map holds NaN, inf or huge values")
    valid = sq >= np.float32(_MIN_NORM * _MIN_NORM)
    if invalid is not None:
        valid &= ~invalid
    inv = np.zeros_like(sq)
    np.sqrt(sq, out=inv, where=valid)
    np.divide(np.float32(1.0), inv, out=inv, where=valid)
    out = n if inplace and n.flags.writeable else np.empty_like(n)
    for c in range(3):
        np.multiply(n[..., c], inv, out=out[..., c])
    return out


def decode_normal_png(img: np.ndarray, path: PathLike, field: str = "normal") -> np.ndarray:
    """Normals from an RGB image array (already in R, G, B order) encoding ``(n + 1) / 2 * max``."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise DataError(path, field, f"expected a 3-channel RGB normal image, got shape {tuple(img.shape)}")
    if img.dtype == np.uint8:
        scale = 255.0
    elif img.dtype == np.uint16:
        scale = 65535.0
    else:
        raise DataError(path, field, f"expected an 8-bit or 16-bit normal image, got dtype {img.dtype}")
    invalid = (img[..., 0] | img[..., 1] | img[..., 2]) == 0
    n = img.astype(np.float32)
    n *= np.float32(2.0 / scale)
    n -= np.float32(1.0)
    return finish_normal(n, path, field, invalid, inplace=True)


def read_normal(path: PathLike, field: str = "normal") -> np.ndarray:
    """Unit normals ``float32 [H, W, 3]`` (0 = invalid) from a PNG, ``.npy`` or ``.exr`` file (module doc)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return finish_normal(read_npy(path, field), path, field, inplace=True)
    if not path.is_file():
        raise DataError(path, field, "file not found")
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        if suffix == ".exr":
            raise DataError(path, field,
                            "OpenCV cannot decode this OpenEXR file: either the file is corrupt, or this "
                            "OpenCV build has no OpenEXR support (cv2.getBuildInformation() lists 'OpenEXR: "
                            "NO') or it is disabled (set OPENCV_IO_ENABLE_OPENEXR=1 before starting Python); "
                            "convert the normals to .npy (float32 [H, W, 3]) or to an (n+1)/2*255 RGB PNG")
        raise DataError(path, field, "cannot decode the image (corrupt or not an image file)")
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[..., :3]
    if img.ndim != 3 or img.shape[2] != 3:
        raise DataError(path, field, f"expected a 3-channel normal image, got shape {tuple(img.shape)}")
    img = img[..., ::-1]  # OpenCV's BGR -> R, G, B = x, y, z
    if suffix == ".exr":
        return finish_normal(np.ascontiguousarray(img), path, field, inplace=True)
    return decode_normal_png(img, path, field)
