"""The raw sample every file-backed dataset reads, its checks, and its conversion to the tensor sample.

Datasets read files into a *raw sample* of numpy arrays in image layout (rows, columns, channels):

- ``image``  ``[H, W, 3]`` RGB, ``uint8`` (0..255) or floating point in [0, 1]
- ``seg``    ``[H, W]`` integer class ids, ``255`` = ignore
- ``depth``  ``[H, W]`` float32 metres, ``0`` = invalid
- ``normal`` ``[H, W, 3]`` float32 unit vectors in the camera frame (x right, y down, z forward),
  ``0`` = invalid
- ``boxes``  ``[N, 4]`` float32 xyxy pixels, ``labels`` ``[N]`` int64
- ``meta``   dict: ``source`` (the image file), ``files`` (every file read), ``size`` (original H, W), ...

A key is absent when the dataset has no such label. ``mtvision.data.transforms`` works on raw samples;
:func:`to_tensor_sample` turns one into the *tensor sample* the models and losses consume: channels
first (``image`` float32 ``[3,H,W]`` normalised, ``seg`` int64 ``[H,W]``, ``depth`` ``[1,H,W]``,
``normal`` ``[3,H,W]``), ``boxes``/``labels`` as tensors, ``meta`` as is.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch

__all__ = ["DataError", "IGNORE_INDEX", "RawDataset", "check_raw_sample", "to_tensor_sample"]

IGNORE_INDEX = 255


class DataError(ValueError):
    """A sample cannot be read or is malformed; the message names the file and the field.

    ``path`` is the offending file and ``field`` the sample key (``image``, ``seg``, ...) or file field.
    """

    def __init__(self, path: Any, field: str, message: str):
        self.path, self.field = str(path), field
        super().__init__(f"{path}: {field}: {message}")


def check_raw_sample(raw: dict, num_classes: Optional[int] = None, source: Any = None) -> dict:
    """Check shapes, dtypes and value ranges of a raw sample; raise :class:`DataError` naming
    ``source`` (default ``raw["meta"]["source"]``) and the field. Returns ``raw`` unchanged.

    ``seg`` values must be in ``[0, num_classes)`` or ``255``; depth finite and ``>= 0``; normals finite;
    every dense label the image's size.
    """
    src = source if source is not None else raw.get("meta", {}).get("source", "<sample>")
    image = raw.get("image")
    if image is None:
        raise DataError(src, "image", "missing")
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(src, "image", f"expected [H, W, 3] RGB, got shape {tuple(image.shape)}")
    h, w = image.shape[:2]
    expected = {"seg": (h, w), "depth": (h, w), "normal": (h, w, 3)}
    for key, shape in expected.items():
        if key in raw and tuple(raw[key].shape) != shape:
            raise DataError(src, key, f"expected shape {shape} (the image's), got {tuple(raw[key].shape)}")
    if "seg" in raw:
        seg = raw["seg"]
        if not np.issubdtype(seg.dtype, np.integer):
            raise DataError(src, "seg", f"expected integer class ids, got dtype {seg.dtype}")
        if num_classes is not None:
            bad = (seg != IGNORE_INDEX) & ((seg < 0) | (seg >= num_classes))
            if bad.any():
                values = np.unique(seg[bad])[:5].tolist()
                raise DataError(src, "seg", f"label value(s) {values} out of range: expected "
                                            f"0..{num_classes - 1} or {IGNORE_INDEX} (ignore)")
    if "depth" in raw:
        d = raw["depth"]
        if not np.isfinite(d).all() or (d < 0).any():
            raise DataError(src, "depth", "expected finite metres >= 0 (0 = invalid)")
    if "normal" in raw and not np.isfinite(raw["normal"]).all():
        raise DataError(src, "normal", "expected finite unit vectors (0 = invalid)")
    if "boxes" in raw:
        b = raw["boxes"]
        if b.ndim != 2 or b.shape[1] != 4:
            raise DataError(src, "boxes", f"expected [N, 4] xyxy, got shape {tuple(b.shape)}")
        if len(raw.get("labels", ())) != len(b):
            raise DataError(src, "labels", f"expected {len(b)} labels (one per box)")
    return raw


def to_tensor_sample(raw: dict, mean: Sequence[float], std: Sequence[float]) -> dict:
    """The tensor sample of a raw sample: ``image`` float32 ``[3,H,W]`` normalised with ``mean``/``std``
    (per RGB channel, for the image in [0, 1]), ``seg`` int64 ``[H,W]``, ``depth`` float32 ``[1,H,W]``,
    ``normal`` float32 ``[3,H,W]``, ``boxes`` float32 ``[N,4]``, ``labels`` int64 ``[N]``, ``meta`` as is."""
    image = raw["image"]
    # One HWC -> CHW copy, then in-place per-channel arithmetic on contiguous planes (numpy is ~10x
    # slower broadcasting over a trailing axis of 3); same float32 operations, so the same result.
    chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    if image.dtype == np.uint8:
        chw /= np.float32(255.0)
    chw -= np.asarray(mean, dtype=np.float32)[:, None, None]
    chw /= np.asarray(std, dtype=np.float32)[:, None, None]
    out: dict = {"image": torch.from_numpy(chw)}
    if "seg" in raw:
        out["seg"] = torch.from_numpy(np.ascontiguousarray(raw["seg"], dtype=np.int64))
    if "depth" in raw:
        out["depth"] = torch.from_numpy(np.ascontiguousarray(raw["depth"], dtype=np.float32)[None])
    if "normal" in raw:
        out["normal"] = torch.from_numpy(
            np.ascontiguousarray(raw["normal"].transpose(2, 0, 1), dtype=np.float32))
    if "boxes" in raw:
        out["boxes"] = torch.from_numpy(np.ascontiguousarray(raw["boxes"], dtype=np.float32).reshape(-1, 4))
        out["labels"] = torch.from_numpy(np.ascontiguousarray(raw.get("labels", ()), dtype=np.int64))
    out["meta"] = dict(raw.get("meta", {}))
    return out



class SkippedSample(NamedTuple):
    """What a dataset with ``skip_bad`` returns for a sample it cannot read: its index and the
    :class:`DataError` message (which names the file and the field)."""

    index: int
    reason: str


class RawDataset(torch.utils.data.Dataset):
    """Base of the file-backed datasets: a subclass implements ``__len__`` and ``read_raw(index) -> raw
    sample``; this class checks it, applies the transform and converts it to the tensor sample.

    ``dataset[i]`` and ``dataset[(i, seed)]`` both work: the transform's randomness comes from
    ``np.random.default_rng(seed)`` (``seed`` an int or a sequence of ints; default ``(self.seed, i)``), so
    a sample's augmentation depends on the seed the sampler hands out, never on the worker process.

    Args:
        transform: ``transform(raw, rng) -> raw`` (``mtvision.data.transforms``) or None.
        mean, std: image normalisation (per RGB channel, image in [0, 1]).
        num_classes: segmentation labels must be ``< num_classes`` or 255.
        seed: the default per-sample seed base.
        skip_bad: return a :class:`SkippedSample` (``collate_samples`` drops it, counts it and names it)
            instead of raising
            :class:`DataError` for a sample that cannot be read.
    """

    num_classes: int
    #: ``data.dataset`` name, for messages
    config_name: str = "file"
    #: constructor arguments ``from_config`` sets from other ``data`` keys (not settable in ``data.kwargs``)
    SET_FROM_CONFIG = ("root", "split", "tasks", "num_classes", "transform", "mean", "std", "seed",
                       "skip_bad")

    @classmethod
    def check_config_kwargs(cls, kwargs: dict) -> None:
        """ConfigError naming ``data.kwargs.<key>`` for a key the constructor does not take (checked
        against its signature) or one ``from_config`` sets from another ``data`` key."""
        from ..registry import check_kwargs

        check_kwargs(cls, kwargs, "data.kwargs", f"the {cls.config_name} dataset",
                     injected=cls.SET_FROM_CONFIG)

    def __init__(self, transform=None, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), seed: int = 0, skip_bad: bool = False):
        self.transform = transform
        self.mean, self.std = tuple(mean), tuple(std)
        self.seed = int(seed)
        self.skip_bad = bool(skip_bad)

    def read_raw(self, index: int) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index):
        index, seed = index if isinstance(index, tuple) else (index, (self.seed, int(index)))
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{type(self).__name__}: index {index} out of range [0, {len(self)})")
        try:
            raw = check_raw_sample(self.read_raw(index), getattr(self, "num_classes", None))
        except DataError as e:
            if self.skip_bad:
                return SkippedSample(index, str(e))
            raise
        if self.transform is not None:
            raw = self.transform(raw, np.random.default_rng(seed))
        return to_tensor_sample(raw, self.mean, self.std)
