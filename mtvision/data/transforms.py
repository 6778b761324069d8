"""Geometry-aware joint transforms on raw samples: the image and every label through one geometry.

One :class:`MultiTaskTransform` moves the image and every label of a raw sample
(:mod:`mtvision.data.sample`: numpy HWC ``image``, ``seg``, ``depth``, ``normal``, ``boxes``/``labels``)
through the same geometry, in this order:

1. **resize** to ``size`` (the network input) when the input differs: image bilinear (area when
   shrinking), dense labels nearest neighbour, boxes scaled. Depth values are unchanged: a fixed resize
   to the network input is not a zoom. With ``keep_ratio`` the image is resized to fit inside ``size``
   with its aspect ratio kept (the largest such size), and step 3 pads it at the bottom and right.
2. **random scale** ``s ~ U(scale_range)``: everything resized by ``s`` (labels nearest); metric depth is
   divided by ``s`` (MTAN's convention: zooming in by ``s`` = moving ``s`` times closer).
3. **random crop** to ``crop`` (default ``size``). Where the scaled image is smaller than the crop it is
   placed at a random offset inside the crop and the rest is padded: image ``0`` (black), ``seg``
   ``ignore_index``, ``depth`` ``0`` (invalid), ``normal`` ``0`` (invalid). Boxes are shifted and clipped
   to the visible image; a box with no area left is dropped with its label.
4. **horizontal flip** with probability ``hflip``: the image and every label mirrored, the normal's x
   component negated (camera frame: x right, y down, z forward), boxes mirrored.
5. **colour jitter** (brightness, contrast, saturation, each factor ``U(1 - j, 1 + j)``, in a random
   order) on the image only, with albumentations' functional colour ops.

Steps 1-4 are one geometric map, applied once per array: the image is interpolated once (steps 1 and 2
together), dense labels are *gathered* with integer nearest-neighbour indices (pixel-centre aligned, so
they line up with the bilinear image), which copies values and never mixes them: ignore/invalid pixels
stay exactly ignore/invalid, normals keep unit length, class ids stay in their label set. Box
coordinates are continuous pixel-edge coordinates (pixel ``i`` covers ``[i, i + 1)``), so a box drawn
around a rectangle of label pixels stays around it (within half a pixel of rounding).

All randomness comes from the ``numpy.random.Generator`` passed to ``__call__``: the same seed gives the
same output, whatever the worker process. The drawn parameters are written to ``meta["transform"]``.

Why not one ``albumentations.Compose`` with ``additional_targets``: it cannot negate normal x on flip or
divide depth by the drawn scale; it pads every mask with one ``fill_mask`` value (depth would be padded
with the seg ignore value 255); it resizes masks with ``cv2.INTER_NEAREST``, which is shifted by up to
one source pixel from the bilinear image (``INTER_NEAREST_EXACT`` would fix that); it casts ``int64``
masks to ``int32``; and its parameters come from its own generators (re-seedable per call, but then
fished back out of ``applied_transforms``). Drawing the parameters here and applying one exact map is
simpler to get right and faster than the equivalent ``Compose``. albumentations supplies the colour
ops; its import-time update check (a network request) is switched off.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import cv2
import numpy as np

from ..config import DataConfig
from .sample import IGNORE_INDEX

__all__ = ["MultiTaskTransform", "boxes_to_original", "build_transform"]

# dtypes cv2.remap copies exactly; 64-bit ints (which cv2 would silently cast to int32) are reinterpreted
# as int32 pairs, anything else goes through numpy indexing.
_REMAP_DTYPES = {np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32,
                                        np.float64)}
_WIDE_INTS = {np.dtype(np.int64), np.dtype(np.uint64)}

_albu_fpixel = None


def _colour_ops():
    """albumentations' functional colour ops, imported on first use (it costs ~0.5 s). Its import-time
    update check (a PyPI request) is switched off: mtvision never touches the network at run time."""
    global _albu_fpixel
    if _albu_fpixel is None:
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        from albumentations.augmentations.pixel import functional as fpixel

        _albu_fpixel = fpixel
    return _albu_fpixel


def _pair(v, name: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in v)
    except (TypeError, ValueError):
        raise ValueError(f"MultiTaskTransform: {name} must be (H, W), got {v!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"MultiTaskTransform: {name} must be positive, got {v!r}")
    return h, w


def _axis(n_out: int, offset: int, n_scaled: int, flip: bool) -> tuple[int, int, int, int]:
    """Output positions ``[lo, hi)`` along one axis that show the scaled image, and the scaled-image
    positions ``[p0, p1)`` they show (in reverse order when ``flip``). ``offset`` is the crop's start in
    the scaled image (negative when the image is placed inside a larger, padded crop)."""
    lo, hi = max(0, -offset), min(n_out, n_scaled - offset)  # before the flip
    p0, p1 = lo + offset, hi + offset
    if flip:
        lo, hi = n_out - hi, n_out - lo
    return lo, hi, p0, p1


def _nearest_src(p0: int, p1: int, n_scaled: int, n_src: int, flip: bool) -> np.ndarray:
    """Source indices of scaled positions ``p0..p1-1``: pixel-centre aligned nearest neighbour
    (``floor((p + 0.5) * n_src / n_scaled)``, as ``cv2.INTER_NEAREST_EXACT``)."""
    src = np.minimum(((np.arange(p0, p1) + 0.5) * (n_src / n_scaled)).astype(np.int64), n_src - 1)
    return src[::-1] if flip else src


class _NearestMap:
    """The dense labels' geometry for one call: output block ``[r_lo, r_hi) x [c_lo, c_hi)`` shows source
    pixels ``r_src x c_src`` (pixel-centre aligned nearest neighbour), the rest of ``out_hw`` is padding.
    Applying it copies source values exactly, so ignore/invalid pixels, class ids and unit normals are
    kept bit for bit."""

    def __init__(self, out_hw: tuple[int, int], rows, cols):
        self.out_hw = tuple(out_hw)
        (self.r_lo, self.r_hi, self.r_src), (self.c_lo, self.c_hi, self.c_src) = rows, cols
        self._map = None

    def remap_table(self) -> np.ndarray:
        """The int16 ``(x, y)`` table of ``cv2.remap`` (``-1`` = padding), built once per call."""
        if self._map is None:
            m = np.full(self.out_hw + (2,), -1, dtype=np.int16)
            m[self.r_lo:self.r_hi, self.c_lo:self.c_hi, 0] = self.c_src[None, :]
            m[self.r_lo:self.r_hi, self.c_lo:self.c_hi, 1] = self.r_src[:, None]
            self._map = m
        return self._map

    @staticmethod
    def _run(idx: np.ndarray):
        """``idx`` as a slice when it is a run of consecutive indices (step +1 or -1), else None."""
        if len(idx) == 0:
            return slice(0, 0)
        step = 1 if len(idx) == 1 else int(idx[1] - idx[0])
        if step not in (1, -1) or not (np.diff(idx) == step).all():
            return None
        stop = int(idx[-1]) + step
        return slice(int(idx[0]), None if stop < 0 else stop, step)

    def _slice(self, arr: np.ndarray):
        rows, cols = self._run(self.r_src), self._run(self.c_src)
        return None if rows is None or cols is None else arr[rows, cols]

    def __call__(self, arr: np.ndarray, fill, dtype) -> np.ndarray:
        """A new array of ``out_hw`` (+ ``arr``'s channels), ``dtype``: the mapped ``arr``, ``fill`` in the
        padding."""
        dtype = np.dtype(dtype)
        shape = self.out_hw + arr.shape[2:]
        block = self._slice(arr)
        if block is not None:  # scale 1: a plain (possibly mirrored) crop
            if block.shape == shape:
                return np.array(block, dtype=dtype)
            out = np.full(shape, fill, dtype=dtype)
            out[self.r_lo:self.r_hi, self.c_lo:self.c_hi] = block
            return out
        channels = arr.shape[2] if arr.ndim == 3 else 1
        small = max(arr.shape[:2]) < 2**15  # the int16 table's range
        if dtype == arr.dtype and arr.ndim in (2, 3) and small and (
                (dtype in _REMAP_DTYPES and channels <= 4) or (dtype in _WIDE_INTS and channels <= 2)):
            # cv2.remap with an integer table: exact copies, several times faster than numpy's fancy
            # indexing of [H, W, 3] arrays; the constant border fills the padding. 64-bit ints (which cv2
            # would cast to int32) are copied bit for bit as pairs of int32 channels.
            src = np.ascontiguousarray(arr)
            if dtype in _WIDE_INTS:
                src = src.reshape(src.shape[0], src.shape[1], -1).view(np.int32)
                border = tuple(np.array([fill], dtype=dtype).view(np.int32).tolist()) * channels
            else:
                border = (fill,) * 4
            out = cv2.remap(src, self.remap_table(), None, cv2.INTER_NEAREST,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=border)
            return np.ascontiguousarray(out).view(dtype).reshape(shape)
        out = np.full(shape, fill, dtype=dtype)
        if self.r_hi > self.r_lo and self.c_hi > self.c_lo:
            block = arr.take(self.r_src, axis=0).take(self.c_src, axis=1)
            out[self.r_lo:self.r_hi, self.c_lo:self.c_hi] = block
        return out


class MultiTaskTransform:
    """Resize to ``size``, then (training) random scale, random crop, horizontal flip and colour jitter,
    applied jointly to a raw sample's image and labels (see the module docstring for the rules).

    Args:
        size: ``(H, W)`` the input is resized to first (``data.size``).
        hflip: probability of a horizontal flip.
        scale_range: ``(lo, hi)``; the scale factor ``s`` is drawn uniformly from it.
        crop: ``(H, W)`` of the random crop taken after scaling; ``None`` = ``size``.
        color_jitter: strength ``j`` in ``[0, 1)``: brightness, contrast and saturation factors are drawn
            from ``U(1 - j, 1 + j)``; ``0`` = off.
        ignore_index: the segmentation padding value.
        keep_ratio: resize to the largest size that fits inside ``size`` with the input's aspect ratio
            (detection's usual resize) instead of to ``size``; where the (scaled) image is then smaller
            than the crop it sits at the crop's top left, padded at the bottom and right (no random
            placement), so an evaluation is deterministic and the padding is where boxes never are.

    ``__call__(raw, rng)`` returns a new raw sample (inputs are never modified): ``image`` uint8 stays
    uint8, a float image comes back float32 in [0, 1]; ``seg`` keeps its integer dtype; ``depth`` and
    ``normal`` are float32; ``boxes`` float32 ``[N, 4]`` and ``labels`` int64 with the dropped boxes
    removed; ``meta`` is copied with ``meta["transform"]`` = the applied parameters: ``input_size``,
    ``size``, ``scale``, ``scaled_size`` (H, W), ``crop`` (x0, y0, x1, y1 in the scaled image; past its
    edges where padded), ``hflip``, ``color_jitter`` (factors and order, or None). Other keys are passed
    through unchanged.
    """

    def __init__(self, size: Sequence[int], hflip: float = 0.0, scale_range: Sequence[float] = (1.0, 1.0),
                 crop: Optional[Sequence[int]] = None, color_jitter: float = 0.0,
                 ignore_index: int = IGNORE_INDEX, keep_ratio: bool = False):
        self.size = _pair(size, "size")
        self.keep_ratio = bool(keep_ratio)
        self.crop = self.size if crop is None else _pair(crop, "crop")
        lo, hi = (float(x) for x in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"MultiTaskTransform: scale_range must be 0 < lo <= hi, got {scale_range!r}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"MultiTaskTransform: hflip must be a probability in [0, 1], got {hflip!r}")
        if not 0.0 <= color_jitter < 1.0:
            raise ValueError(f"MultiTaskTransform: color_jitter must be in [0, 1), got {color_jitter!r}")
        self.scale_range = (lo, hi)
        self.hflip = float(hflip)
        self.color_jitter = float(color_jitter)
        self.ignore_index = int(ignore_index)

    def __repr__(self) -> str:
        return (f"MultiTaskTransform(size={self.size}, hflip={self.hflip}, scale_range={self.scale_range}, "
                f"crop={self.crop}, color_jitter={self.color_jitter}, ignore_index={self.ignore_index}, "
                f"keep_ratio={self.keep_ratio})")

    # -- parameters ---------------------------------------------------------------------------------

    def _draw(self, rng: np.random.Generator, input_size: tuple[int, int]) -> dict[str, Any]:
        """Every random choice, in a fixed order, from ``rng`` only (the same draws with and without
        ``keep_ratio``)."""
        (h, w), (ch, cw) = self.size, self.crop
        if self.keep_ratio:
            r = min(h / input_size[0], w / input_size[1])
            h, w = max(1, int(round(input_size[0] * r))), max(1, int(round(input_size[1] * r)))
        lo, hi = self.scale_range
        s = float(rng.uniform(lo, hi)) if hi > lo else lo
        hs, ws = max(1, int(round(h * s))), max(1, int(round(w * s)))
        # The crop lies inside the scaled image, or (where the image is smaller) contains it.
        y0 = int(rng.integers(min(0, hs - ch), max(0, hs - ch) + 1))
        x0 = int(rng.integers(min(0, ws - cw), max(0, ws - cw) + 1))
        if self.keep_ratio:  # a smaller image sits at the top left, padded at the bottom and right
            y0, x0 = max(0, y0), max(0, x0)
        flip = bool(rng.random() < self.hflip) if self.hflip > 0 else False
        colour = None
        if self.color_jitter > 0:
            j = self.color_jitter
            b, c, sat = (float(v) for v in rng.uniform(1.0 - j, 1.0 + j, size=3))
            colour = {"brightness": b, "contrast": c, "saturation": sat,
                      "order": [("brightness", "contrast", "saturation")[i] for i in rng.permutation(3)]}
        return {"scale": s, "scaled_size": (hs, ws), "crop": (x0, y0, x0 + cw, y0 + ch), "hflip": flip,
                "color_jitter": colour}

    # -- application --------------------------------------------------------------------------------

    def __call__(self, raw: dict, rng: np.random.Generator) -> dict:
        image = raw["image"]
        h0, w0 = image.shape[:2]
        p = self._draw(rng, (h0, w0))
        s, (hs, ws), flip = p["scale"], p["scaled_size"], p["hflip"]
        x0, y0 = p["crop"][:2]
        ch, cw = self.crop
        rows, cols = _axis(ch, y0, hs, False), _axis(cw, x0, ws, flip)

        out = {k: v for k, v in raw.items() if k not in ("image", "seg", "depth", "normal", "boxes", "labels",
                                                          "meta")}
        out["image"] = self._image(image, (hs, ws), rows, cols, flip, p["color_jitter"])

        nearest = _NearestMap((ch, cw), (*rows[:2], _nearest_src(rows[2], rows[3], hs, h0, False)),
                              (*cols[:2], _nearest_src(cols[2], cols[3], ws, w0, flip)))
        if "seg" in raw:
            seg = raw["seg"]
            out["seg"] = nearest(seg, self.ignore_index,
                                 np.promote_types(seg.dtype, np.min_scalar_type(self.ignore_index)))
        if "depth" in raw:
            depth = nearest(np.asarray(raw["depth"], dtype=np.float32), 0.0, np.float32)
            if s != 1.0:
                np.divide(depth, np.float32(s), out=depth)  # 0 (invalid) stays exactly 0
            out["depth"] = depth
        if "normal" in raw:
            normal = nearest(np.asarray(raw["normal"], dtype=np.float32), 0.0, np.float32)
            if flip:
                # x -> -x as 0 - x, so invalid zeros stay +0.0 (a plain negation would give -0.0)
                np.subtract(np.float32(0.0), normal[..., 0], out=normal[..., 0])
            out["normal"] = normal
        if "boxes" in raw:
            out.update(self._boxes(raw, (h0, w0), (hs, ws), (x0, y0), flip))

        meta = dict(raw.get("meta", {}))
        meta["transform"] = {"input_size": (h0, w0), "size": self.size, **p}
        out["meta"] = meta
        return out

    def _image(self, image: np.ndarray, scaled: tuple[int, int], rows, cols, flip: bool,
               colour) -> np.ndarray:
        if image.dtype != np.uint8:
            if not np.issubdtype(image.dtype, np.floating):
                raise TypeError(f"MultiTaskTransform: image must be uint8 or float in [0, 1], "
                                f"got {image.dtype}")
            image = image.astype(np.float32, copy=False)
        (h0, w0), (hs, ws) = image.shape[:2], scaled
        if (hs, ws) != (h0, w0):
            shrink = hs <= h0 and ws <= w0
            image = cv2.resize(image, (ws, hs), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        (r_lo, r_hi, p0, p1), (c_lo, c_hi, q0, q1) = rows, cols
        ch, cw = self.crop
        if (r_lo, r_hi, p0, p1, c_lo, c_hi, q0, q1) != (0, ch, 0, hs, 0, cw, 0, ws) or flip:
            block = image[p0:p1, q0:q1]
            canvas = np.zeros((ch, cw, 3), dtype=image.dtype)
            canvas[r_lo:r_hi, c_lo:c_hi] = block[:, ::-1] if flip else block
            image = canvas
        if colour is not None:
            image = self._jitter(np.ascontiguousarray(image), colour)
        return image

    @staticmethod
    def _jitter(image: np.ndarray, colour: dict) -> np.ndarray:
        f = _colour_ops()
        ops = {"brightness": f.adjust_brightness_torchvision, "contrast": f.adjust_contrast_torchvision,
               "saturation": f.adjust_saturation_torchvision}
        for name in colour["order"]:
            image = ops[name](image, colour[name])
        if image.dtype != np.uint8:
            image = np.clip(image, 0.0, 1.0).astype(np.float32, copy=False)
        return image

    def _boxes(self, raw: dict, src: tuple[int, int], scaled: tuple[int, int], origin: tuple[int, int],
               flip: bool) -> dict:
        (h0, w0), (hs, ws), (x0, y0) = src, scaled, origin
        ch, cw = self.crop
        b = np.asarray(raw["boxes"], dtype=np.float64).reshape(-1, 4)
        b = b * np.array([ws / w0, hs / h0, ws / w0, hs / h0]) - np.array([x0, y0, x0, y0])
        # clip to the part of the crop that shows the image (not the padding)
        b[:, 0::2] = b[:, 0::2].clip(max(0, -x0), min(cw, ws - x0))
        b[:, 1::2] = b[:, 1::2].clip(max(0, -y0), min(ch, hs - y0))
        if flip:
            b[:, [0, 2]] = cw - b[:, [2, 0]]
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        out = {"boxes": b[keep].astype(np.float32)}
        if "labels" in raw:
            out["labels"] = np.asarray(raw["labels"], dtype=np.int64).reshape(-1)[keep]
        return out


def boxes_to_original(boxes, transform: Mapping) -> np.ndarray:
    """Boxes ``[K, 4]`` xyxy in the network input's pixels (numpy or tensor) -> the original image's
    pixels, inverting the :class:`MultiTaskTransform` recorded in a sample's ``meta["transform"]``
    (``input_size`` (H0, W0), ``scaled_size``, ``crop`` (x0, y0, x1, y1), ``hflip``), clipped to the
    original image. Float64 numpy."""
    if hasattr(boxes, "detach"):  # a tensor
        boxes = boxes.detach().cpu().numpy()
    b = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    h0, w0 = (float(v) for v in transform["input_size"])
    hs, ws = (float(v) for v in transform["scaled_size"])
    x0, y0, x1, _ = (float(v) for v in transform["crop"])
    if transform.get("hflip"):
        b[:, [0, 2]] = (x1 - x0) - b[:, [2, 0]]
    b += np.array([x0, y0, x0, y0])
    b *= np.array([w0 / ws, h0 / hs, w0 / ws, h0 / hs])
    b[:, 0::2] = b[:, 0::2].clip(0.0, w0)
    b[:, 1::2] = b[:, 1::2].clip(0.0, h0)
    return b


def build_transform(data: DataConfig, train: bool) -> MultiTaskTransform:
    """The transform of ``data``: training = resize to ``data.size`` + ``data.augment``; evaluation =
    resize to ``data.size`` only (depth values unchanged)."""
    if not train:
        return MultiTaskTransform(tuple(data.size), ignore_index=IGNORE_INDEX, keep_ratio=data.keep_ratio)
    a = data.augment
    return MultiTaskTransform(tuple(data.size), hflip=a.hflip, scale_range=tuple(a.scale_range),
                              crop=None if a.crop is None else tuple(a.crop), color_jitter=a.color_jitter,
                              ignore_index=IGNORE_INDEX, keep_ratio=data.keep_ratio)
