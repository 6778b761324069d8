"""Tiny dataset fixtures written in the exact on-disk formats the loaders read.

Every writer returns the arrays it wrote (in the loader's output convention) so tests can compare what
comes back. Images are non-square and every pixel/channel holds a distinct value, so a transposed or
flipped axis cannot go unnoticed.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

NYU_SIZE = (6, 8)  # (H, W): non-square on purpose


def distinct_image(h: int, w: int, offset: int = 0) -> np.ndarray:
    """uint8 [H, W, 3] with a distinct value per pixel and channel (H * W * 3 <= 256 - offset)."""
    assert h * w * 3 + offset <= 256
    return (np.arange(h * w * 3, dtype=np.int64).reshape(h, w, 3) + offset).astype(np.uint8)


def pattern_labels(h: int, w: int, num_classes: int, offset: int = 0, ignore=None) -> np.ndarray:
    """int64 [H, W] class ids in 0..num_classes-1 depending on the pixel position (row-major), with
    ``ignore`` at the first pixel and the last pixel of row 1 when given."""
    lab = (np.arange(h * w, dtype=np.int64).reshape(h, w) * 5 + offset) % num_classes
    if ignore is not None:
        lab[0, 0] = ignore
        lab[1, w - 1] = ignore
    return lab


def distinct_depth(h: int, w: int, offset: int = 0) -> np.ndarray:
    """float32 [H, W] metres, distinct per pixel (multiples of 1 mm), 0 (invalid) at pixel (2, 1)."""
    d = (np.arange(h * w, dtype=np.float32).reshape(h, w) + 1 + offset) * np.float32(0.125)
    d[2, 1] = 0.0
    return d.astype(np.float32)


def distinct_normals(h: int, w: int, offset: int = 0) -> np.ndarray:
    """float32 [H, W, 3] unit vectors, distinct per pixel, facing the camera (z < 0), 0 at pixel (3, 2)."""
    i = np.arange(h * w, dtype=np.float64).reshape(h, w) + offset
    theta = 0.2 + 0.6 * i / (h * w + offset)  # polar angle from -z
    phi = 0.37 * i
    n = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), -np.cos(theta)], axis=-1)
    n[3, 2] = 0.0
    return n.astype(np.float32)


def encode_normals_png(n: np.ndarray) -> np.ndarray:
    """uint8 RGB of (n + 1) / 2 * 255, 0 in all channels where n is 0."""
    img = np.clip(np.rint((n + 1.0) / 2.0 * 255.0), 0, 255).astype(np.uint8)
    img[~n.any(axis=2)] = 0
    return img


def write_rgb_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))


def write_gray_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)


# ------------------------------------------------------------------------------------------------
# NYUv2, preprocessed (MTAN / LibMTL) layout: root/{split}/{image,label,depth,normal}/{i}.npy


def write_nyuv2_npy(root: Path, split: str = "train", n: int = 3, size=NYU_SIZE, depth_hw1: bool = True,
                    tasks=("seg", "depth", "normal")) -> list[dict]:
    """``n`` samples as MTAN writes them: image float64 [H,W,3] in [0,1], label float [H,W] with -1 = ignore,
    depth [H,W,1] metres (``depth_hw1``) or [H,W], normal [H,W,3] in [-1,1]. Returns, per file number, the
    values the loader must produce (image float32, seg with 255, depth [H,W], normal)."""
    h, w = size
    base = Path(root) / split
    out = []
    for i in range(n):
        image_u8 = distinct_image(h, w, offset=i)
        image = image_u8.astype(np.float64) / 255.0
        label = pattern_labels(h, w, 13, offset=i, ignore=-1).astype(np.float32)
        depth = distinct_depth(h, w, offset=i)
        normal = distinct_normals(h, w, offset=i)
        arrays = {"image": image, "label": label, "depth": depth[..., None] if depth_hw1 else depth,
                  "normal": normal}
        dirs = {"image": "image", "seg": "label", "depth": "depth", "normal": "normal"}
        for key in ("image",) + tuple(tasks):
            d = base / dirs[key]
            d.mkdir(parents=True, exist_ok=True)
            np.save(d / f"{i}.npy", arrays[dirs[key]])
        seg = label.astype(np.int64)
        seg[seg == -1] = 255
        out.append({"image": image.astype(np.float32), "seg": seg, "depth": depth, "normal": normal})
    return out


# ------------------------------------------------------------------------------------------------
# NYUv2, official release: nyu_depth_v2_labeled.mat (MATLAB v7.3 = HDF5, arrays stored transposed),
# splits.mat (v5, 1-based trainNdxs / testNdxs), classMapping40.mat (v5, mapClass, className).

MAT_HEADER_TEXT = "MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: {} HDF5 schema 1.00 ."


def _write_v73_header(path: Path) -> None:
    """MATLAB's 128-byte text header in the 512-byte HDF5 user block, as MATLAB writes it."""
    text = MAT_HEADER_TEXT.format(time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(0))).encode("ascii")
    header = text.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    with open(path, "r+b") as f:
        f.write(header)


def write_nyuv2_mat(root: Path, n: int = 5, size=NYU_SIZE, num_raw_classes: int = 10,
                    train=(1, 3, 5), test=(2, 4), normals: str | None = "png",
                    normals_dir: str = "normals") -> dict:
    """The official files for ``n`` images of ``size`` (H, W) in ``root``.

    Raw labels use ``num_raw_classes`` classes (the real file has 894) with 0 = unlabelled; the class
    mapping maps raw class k to the 40-class id ``MAP40[k - 1]``. Normals, when asked for, go to
    ``root/normals_dir/{index:04d}.png`` (or ``.npy``), index 0-based. Returns ``{"images", "depths",
    "raw_labels", "map40", "normals"}``, images HWC uint8, depths/labels [N, H, W].
    """
    import h5py
    import scipy.io

    h, w = size
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    images = np.stack([distinct_image(h, w, offset=i) for i in range(n)])  # [N, H, W, 3]
    depths = np.stack([distinct_depth(h, w, offset=i) for i in range(n)])
    raw_labels = np.stack([pattern_labels(h, w, num_raw_classes + 1, offset=i) for i in range(n)])
    raw_labels = raw_labels.astype(np.uint16)
    # 40-class ids covering unlabelled-after-mapping (0), wall (1), floor mat (20), television (25), ...
    map40 = np.array([1, 2, 4, 20, 25, 0, 22, 39, 40, 8, 13, 23][:num_raw_classes], dtype=np.float64)
    assert len(map40) == num_raw_classes
    path = root / "nyu_depth_v2_labeled.mat"
    with h5py.File(path, "w", userblock_size=512) as f:
        # MATLAB (column-major) H x W x 3 x N appears to HDF5 readers as N x 3 x W x H.
        for name, arr, cls in (("images", images.transpose(0, 3, 2, 1), "uint8"),
                               ("depths", depths.transpose(0, 2, 1), "single"),
                               ("labels", raw_labels.transpose(0, 2, 1), "uint16")):
            ds = f.create_dataset(name, data=np.ascontiguousarray(arr), chunks=True, compression="gzip")
            ds.attrs["MATLAB_class"] = np.bytes_(cls)
    _write_v73_header(path)
    scipy.io.savemat(root / "splits.mat", {"trainNdxs": np.asarray(train, dtype=np.float64)[:, None],
                                           "testNdxs": np.asarray(test, dtype=np.float64)[:, None]})
    class_names = np.empty((1, 40), dtype=object)
    for k in range(40):
        class_names[0, k] = f"class{k + 1}"
    scipy.io.savemat(root / "classMapping40.mat", {"mapClass": map40[None, :], "className": class_names})
    normal_maps = np.stack([distinct_normals(h, w, offset=i) for i in range(n)])
    if normals is not None:
        d = root / normals_dir
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            if normals == "png":
                write_rgb_png(d / f"{i:04d}.png", encode_normals_png(normal_maps[i]))
            else:
                np.save(d / f"{i:04d}.npy", normal_maps[i])
    return {"images": images, "depths": depths, "raw_labels": raw_labels.astype(np.int64),
            "map40": map40.astype(np.int64), "normals": normal_maps}


# ------------------------------------------------------------------------------------------------
# Custom folder layout: root/{split}/images/<stem>.png, seg/<stem>.png, depth/<stem>.png|.npy,
# normal/<stem>.png|.npy, root/classes.txt


def write_custom(root: Path, split: str = "train", stems=("a", "b"), size=(5, 7), num_classes: int = 4,
                 tasks=("seg", "depth", "normal"), depth_format: str = "png", normal_format: str = "png",
                 seg_bits: int = 8, depth_scale: float = 1000.0, classes: bool = True) -> dict:
    """Returns ``{stem: {"image", "seg", "depth", "normal", "boxes", "labels"}}`` with the values the loader
    must produce (normals from PNG are the quantised ones, within ~0.01 of ``normal``); with ``det`` in
    ``tasks`` each image gets two boxes (one reaching half a pixel past the right edge: clipped) in a
    box file with a comment and a blank line."""
    h, w = size
    root = Path(root)
    base = root / split
    out = {}
    for k, stem in enumerate(stems):
        image = distinct_image(h, w, offset=k)
        write_rgb_png(base / "images" / f"{stem}.png", image)
        seg = pattern_labels(h, w, num_classes, offset=k, ignore=255)
        depth = distinct_depth(h, w, offset=k)
        normal = distinct_normals(h, w, offset=k)
        if "seg" in tasks:
            write_gray_png(base / "seg" / f"{stem}.png", seg.astype(np.uint8 if seg_bits == 8 else np.uint16))
        if "depth" in tasks:
            if depth_format == "png":
                mm = np.rint(depth * depth_scale).astype(np.uint16)
                write_gray_png(base / "depth" / f"{stem}.png", mm)
                depth = mm.astype(np.float32) / np.float32(depth_scale)
            else:
                (base / "depth").mkdir(parents=True, exist_ok=True)
                np.save(base / "depth" / f"{stem}.npy", depth)
        if "normal" in tasks:
            if normal_format == "png":
                write_rgb_png(base / "normal" / f"{stem}.png", encode_normals_png(normal))
            else:
                (base / "normal").mkdir(parents=True, exist_ok=True)
                np.save(base / "normal" / f"{stem}.npy", normal)
        boxes = np.array([[0.5, 1.0, 3.0 + k, h - 1.0], [2.0, 0.0, w + 0.5, 2.5]], np.float32)
        labels = np.array([k % num_classes, (k + 1) % num_classes], np.int64)
        if "det" in tasks:
            (base / "det").mkdir(parents=True, exist_ok=True)
            lines = ["# class x1 y1 x2 y2", ""] + [f"{c} {' '.join(str(float(v)) for v in b)}"
                                                   for c, b in zip(labels, boxes)]
            (base / "det" / f"{stem}.txt").write_text("\n".join(lines) + "\n")
        boxes[:, 2] = np.minimum(boxes[:, 2], w)
        out[stem] = {"image": image, "seg": seg, "depth": depth, "normal": normal, "boxes": boxes,
                     "labels": labels}
    if classes:
        (root / "classes.txt").write_text("".join(f"thing{c}\n" for c in range(num_classes)))
    return out
