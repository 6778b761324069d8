"""Cityscapes (Cordts et al., 2016) read from the official folder tree: semantic segmentation (19 train
classes, or the 7 categories of MTAN / LibMTL) and metric depth from the stereo disparity maps.

Layout (the official ``leftImg8bit_trainvaltest``, ``gtFine_trainvaltest``, ``disparity_trainvaltest``
and ``camera_trainvaltest`` packages unpacked into one ``root``)::

    root/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png    RGB image
    root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png     8-bit label ids
    root/disparity/{split}/{city}/{city}_{seq}_{frame}_disparity.png        16-bit disparity
    root/camera/{split}/{city}/{city}_{seq}_{frame}_camera.json             calibration

Labels come from the label table of ``cityscapesscripts.helpers.labels`` (never copied here): a label id
whose label has ``ignoreInEval`` becomes 255 (ignore); the others become their ``trainId`` (19 classes)
or, for ``num_classes=7``, the index of their ``category`` among the categories that hold an evaluated
label, in ``categoryId`` order: flat, construction, object, nature, sky, human, vehicle (``void`` holds
none). That is the 7-class set of MTAN (Liu et al., 2019), used by LibMTL, Nash-MTL and FAMO, and the
"categories" of the official evaluation script, which also ignores the ``ignoreInEval`` labels
(parking, rail track, guard rail, bridge, tunnel, polegroup, caravan, trailer) when it scores categories.

Depth: a disparity PNG value ``p > 0`` is the disparity ``d = (p - 1) / 256`` pixels (the dataset's
README); depth is ``baseline * fx / d`` metres with ``extrinsic.baseline`` (metres) and ``intrinsic.fx``
(pixels) of the image's camera JSON. ``p = 0`` marks an invalid measurement, and ``p = 1`` encodes
``d = 0``, a point at infinity with no finite depth: both become 0 (invalid).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..registry import DATASETS
from ..config import ConfigError
from .io import read_image, read_json, read_label_png
from .sample import IGNORE_INDEX, DataError, RawDataset

__all__ = ["CITYSCAPES_TASKS", "Cityscapes", "cityscapes_classes", "disparity_to_depth", "label_id_lut"]

#: The tasks Cityscapes has labels for.
CITYSCAPES_TASKS = ("seg", "depth")

_IMAGE_SUFFIX = "_leftImg8bit.png"
_UNKNOWN = -1  # label-id LUT entry for an id the label table does not define


def _labels():
    from cityscapesscripts.helpers import labels as cs_labels

    return cs_labels


def _evaluated_categories() -> list:
    """``(categoryId, category)`` of the categories holding at least one evaluated label, sorted."""
    cats = {(lb.categoryId, lb.category) for lb in _labels().labels if lb.id >= 0 and not lb.ignoreInEval}
    return sorted(cats)


def cityscapes_classes(num_classes: int) -> tuple[str, ...]:
    """Class names indexed by class id: the 19 train-ID label names, or the 7 category names."""
    cs = _labels()
    if num_classes == 19:
        return tuple(cs.trainId2label[t].name for t in range(19))
    if num_classes == 7:
        return tuple(name for _, name in _evaluated_categories())
    raise ValueError(f"Cityscapes: num_classes must be 19 or 7, got {num_classes}")


def label_id_lut(num_classes: int) -> np.ndarray:
    """``int16 [256]``: label id (as stored in ``*_gtFine_labelIds.png``) -> class id (``num_classes``
    = 19: train id; 7: category index), 255 for labels ignored in evaluation, -1 for ids the label
    table does not define."""
    cityscapes_classes(num_classes)  # validates num_classes
    category_index = {cid: i for i, (cid, _) in enumerate(_evaluated_categories())}
    lut = np.full(256, _UNKNOWN, dtype=np.int16)
    for lb in _labels().labels:
        if not 0 <= lb.id < 256:  # 'license plate' has id -1: never stored in a label image
            continue
        if lb.ignoreInEval:
            lut[lb.id] = IGNORE_INDEX
        else:
            lut[lb.id] = lb.trainId if num_classes == 19 else category_index[lb.categoryId]
    return lut


def disparity_to_depth(disparity_png: np.ndarray, baseline: float, fx: float) -> np.ndarray:
    """Metric depth ``float32`` from the raw 16-bit disparity PNG values; 0 where ``p <= 1`` (invalid)."""
    p = disparity_png.astype(np.float64)
    depth = np.zeros(p.shape, dtype=np.float64)
    valid = p > 1  # p == 0: no measurement; p == 1: zero disparity (infinitely far)
    depth[valid] = baseline * fx / ((p[valid] - 1.0) / 256.0)
    return depth.astype(np.float32)


def _camera_value(camera: dict, section: str, key: str, path: Path) -> float:
    value = camera.get(section, {}).get(key) if isinstance(camera.get(section), dict) else None
    if value is None:
        raise DataError(path, "depth", f"camera JSON without {section}.{key} (needed to turn disparity "
                                       f"into depth)")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise DataError(path, "depth", f"{section}.{key} must be a positive number, got {value!r}")
    return float(value)


@DATASETS.register("cityscapes")
class Cityscapes(RawDataset):
    """Cityscapes from the official folder tree (see the module docstring for the layout and labels).

    Args:
        root: folder holding ``leftImg8bit/``, ``gtFine/`` and (for depth) ``disparity/`` and ``camera/``.
        split: ``train``, ``val`` or ``test`` (any folder name under ``leftImg8bit/``).
        num_classes: 19 (train ids) or 7 (categories).
        tasks: labels to load, a subset of ``("seg", "depth")``; only their files are read.
        transform, mean, std, seed, skip_bad: see :class:`~mtvision.data.sample.RawDataset`.

    Samples are listed from ``leftImg8bit/{split}/*/*_leftImg8bit.png``, sorted by city and name.
    ``meta``: ``source`` (the image), ``files`` (every file read), ``size`` (original ``(H, W)``),
    ``stem`` (``{city}_{seq}_{frame}``) and ``city``. A missing or corrupt file, a label id unknown to
    the label table, or a camera JSON without ``extrinsic.baseline`` / ``intrinsic.fx`` raises
    :class:`~mtvision.data.sample.DataError` naming the file when the sample is read.
    """

    config_name = "cityscapes"

    def __init__(self, root, split: str = "train", num_classes: int = 19,
                 tasks: Sequence[str] = CITYSCAPES_TASKS, transform=None,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                 seed: int = 0, skip_bad: bool = False):
        super().__init__(transform=transform, mean=mean, std=std, seed=seed, skip_bad=skip_bad)
        self.root = Path(root)
        self.split = str(split)
        self.num_classes = int(num_classes)
        self.classes = cityscapes_classes(self.num_classes)
        unknown = [t for t in tasks if t not in CITYSCAPES_TASKS]
        if unknown or not tasks:
            raise ValueError(f"Cityscapes: tasks must be a non-empty subset of {CITYSCAPES_TASKS}, got "
                             f"{list(tasks)} (Cityscapes has no labels for {unknown})")
        self.tasks = tuple(tasks)
        self._lut = label_id_lut(self.num_classes)
        image_dir = self.root / "leftImg8bit" / self.split
        if not image_dir.is_dir():
            raise FileNotFoundError(f"Cityscapes: no image folder {image_dir} (expected the official "
                                    f"layout root/leftImg8bit/{self.split}/<city>/*{_IMAGE_SUFFIX})")
        self.images = sorted(image_dir.glob(f"*/*{_IMAGE_SUFFIX}"))
        if not self.images:
            raise FileNotFoundError(f"Cityscapes: no *{_IMAGE_SUFFIX} images under {image_dir}/<city>/")

    @classmethod
    def from_config(cls, data, split: str, transform, seed: int) -> "Cityscapes":
        """The dataset of a config's ``data`` section (``data.kwargs`` takes no Cityscapes option)."""
        cls.check_config_kwargs(data.kwargs)
        if data.num_classes not in (19, 7):
            raise ConfigError(f"data.num_classes: Cityscapes has 19 (train ids) or 7 (categories) classes, "
                              f"got {data.num_classes}")
        unknown = [t for t in data.tasks if t not in CITYSCAPES_TASKS]
        if unknown:
            raise ConfigError(f"data.tasks: Cityscapes has no labels for {unknown} "
                              f"(available: {', '.join(CITYSCAPES_TASKS)})")
        return cls(data.root, split, num_classes=data.num_classes, tasks=list(data.tasks),
                   transform=transform, mean=tuple(data.mean), std=tuple(data.std), seed=seed,
                   skip_bad=data.skip_bad)

    def __len__(self) -> int:
        return len(self.images)

    def paths(self, index: int) -> dict[str, Path]:
        """The files of sample ``index``: ``image``, ``seg``, ``disparity``, ``camera``."""
        image = self.images[index]
        city = image.parent.name
        stem = image.name[: -len(_IMAGE_SUFFIX)]
        return {
            "image": image,
            "seg": self.root / "gtFine" / self.split / city / f"{stem}_gtFine_labelIds.png",
            "disparity": self.root / "disparity" / self.split / city / f"{stem}_disparity.png",
            "camera": self.root / "camera" / self.split / city / f"{stem}_camera.json",
        }

    def read_raw(self, index: int) -> dict:
        paths = self.paths(index)
        image = read_image(paths["image"])
        raw: dict = {"image": image}
        files = [str(paths["image"])]
        if "seg" in self.tasks:
            raw["seg"] = self._read_seg(paths["seg"])
            files.append(str(paths["seg"]))
        if "depth" in self.tasks:
            raw["depth"] = self._read_depth(paths["disparity"], paths["camera"])
            files += [str(paths["disparity"]), str(paths["camera"])]
        stem = paths["image"].name[: -len(_IMAGE_SUFFIX)]
        raw["meta"] = {"source": str(paths["image"]), "files": files, "size": tuple(image.shape[:2]),
                       "stem": stem, "city": paths["image"].parent.name}
        return raw

    def _read_seg(self, path: Path) -> np.ndarray:
        ids = read_label_png(path, "seg")
        if ids.dtype != np.uint8:
            raise DataError(path, "seg", f"expected an 8-bit label-id PNG (*_gtFine_labelIds.png), "
                                         f"got {ids.dtype}")
        seg = self._lut[ids]
        if (seg == _UNKNOWN).any():
            bad = np.unique(ids[seg == _UNKNOWN])[:5].tolist()
            raise DataError(path, "seg", f"label id(s) {bad} unknown to the Cityscapes label table "
                                         f"(cityscapesscripts.helpers.labels)")
        return seg.astype(np.int64)

    def _read_depth(self, disparity_path: Path, camera_path: Path) -> np.ndarray:
        disparity = read_label_png(disparity_path, "depth")
        if disparity.dtype != np.uint16:
            raise DataError(disparity_path, "depth",
                            f"expected a 16-bit disparity PNG, got {disparity.dtype}")
        camera = read_json(camera_path, "depth")
        baseline = _camera_value(camera, "extrinsic", "baseline", camera_path)
        fx = _camera_value(camera, "intrinsic", "fx", camera_path)
        return disparity_to_depth(disparity, baseline, fx)
