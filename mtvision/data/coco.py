"""COCO-format object detection (Lin et al., ECCV 2014): boxes and class labels from an official
``instances_*.json`` annotation file, for COCO itself or any dataset exported in its format.

Layout (``split`` is ``data.train_split`` / ``data.val_split``; COCO 2017 unpacks as the second form)::

    root/annotations/instances_{split}.json    or  root/annotations/instances_{split}2017.json
    root/{split}/<file_name>                   or  root/{split}2017/<file_name>

The annotation file is the COCO "instances" format: ``images`` (``id``, ``file_name``, optional
``height``/``width``), ``categories`` (``id``, ``name``) and ``annotations`` (``image_id``,
``category_id``, ``bbox = [x, y, w, h]`` in pixels, optional ``iscrowd``). Only what the samples need is
kept (per image: the file name, the id and one box/label array), so the dataset pickles cheaply to
DataLoader workers. Images are listed in ascending image-id order.

Each sample holds ``image``, ``boxes`` float32 ``[N, 4]`` xyxy pixels (``x + w``, ``y + h``, clipped to
the image), ``labels`` int64 ``[N]`` and ``meta`` (``source``: the image, ``files``: the image and the
annotation file, ``size``: the original ``(H, W)``, ``image_id``: the COCO id, ``file_name``); no
``seg`` / ``depth`` / ``normal``. Labels are contiguous, ``0..C-1`` in ascending category-id order
(COCO's 80 categories have ids 1..90 with gaps); :attr:`CocoDetection.cat_ids` maps a label back to its
category id, :attr:`CocoDetection.classes` gives the names.

Left out of a sample: **crowd annotations** (``iscrowd: 1``) -- note that a detection on a crowd region
then counts as a false positive in our AP, whereas the official COCO evaluation ignores detections that
match a crowd region -- and boxes with zero width or height after clipping. Images without annotations
are kept (``boxes`` ``[0, 4]``, ``labels`` ``[0]``).

Pixels are decoded as stored, *ignoring* a JPEG's EXIF orientation tag: that is the frame COCO's boxes
are drawn in (pycocotools and torchvision read images with PIL, which does not apply the tag), while
``cv2.imread`` would rotate such an image and leave its boxes behind. When an image record gives
``height`` / ``width``, the decoded size must match it.

Example config::

    data: {dataset: coco, root: /data/coco, train_split: train, val_split: val, num_classes: 80,
           tasks: [det]}
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import cv2
import numpy as np

from ..registry import DATASETS
from ..config import ConfigError
from .io import read_json
from .sample import DataError, RawDataset

__all__ = ["COCO_TASKS", "CocoDetection", "coco_paths"]

#: The tasks a COCO-format dataset has labels for: detection (``boxes`` + ``labels``).
COCO_TASKS = ("det",)


def _candidates(root: Path, split: str) -> tuple[list[Path], list[Path]]:
    """The annotation files and image folders tried for ``split``, plain naming first."""
    ann = [root / "annotations" / f"instances_{split}{year}.json" for year in ("", "2017")]
    img = [root / split, root / f"{split}2017"]
    return ann, img


def coco_paths(root, split: str) -> tuple[Path, Path]:
    """``(annotation file, image folder)`` of ``split`` under ``root`` (module docstring for the two
    namings; the image folder of the annotation file's naming is preferred). ConfigError naming
    ``data.root`` and every path tried when one is missing."""
    root = Path(root).expanduser()
    anns, dirs = _candidates(root, split)
    ann = next((p for p in anns if p.is_file()), None)
    if ann is None:
        raise ConfigError(f"data.root: no COCO annotation file for split {split!r}; tried "
                          f"{', '.join(str(p) for p in anns)}")
    k = anns.index(ann)
    image_dir = next((d for d in (dirs[k], dirs[1 - k]) if d.is_dir()), None)
    if image_dir is None:
        raise ConfigError(f"data.root: no image folder for split {split!r} ({ann.name}); tried "
                          f"{', '.join(str(d) for d in dirs)}")
    return ann, image_dir


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _records(doc: dict, key: str, path: Path) -> list:
    value = doc.get(key)
    if value is None:
        raise DataError(path, key, "missing (expected the COCO instances format: images, annotations, "
                                   "categories)")
    if not isinstance(value, list):
        raise DataError(path, key, f"expected a list, got {type(value).__name__}")
    for i, rec in enumerate(value):
        if not isinstance(rec, dict):
            raise DataError(path, f"{key}[{i}]", f"expected an object, got {type(rec).__name__}")
    return value


def _int_field(rec: dict, where: str, key: str, path: Path, required: bool = True,
               positive: bool = False) -> Optional[int]:
    if key not in rec:
        if required:
            raise DataError(path, f"{where}.{key}", "missing")
        return None
    v = rec[key]
    if not _is_int(v) or (positive and v <= 0):
        kind = "a positive integer" if positive else "an integer"
        raise DataError(path, f"{where}.{key}", f"expected {kind}, got {v!r}")
    return v


def _str_field(rec: dict, where: str, key: str, path: Path) -> str:
    v = rec.get(key)
    if not isinstance(v, str) or not v:
        raise DataError(path, f"{where}.{key}",
                        "missing" if v is None else f"expected a non-empty string, got {v!r}")
    return v


def _parse(path: Path):
    """The per-image arrays of an annotation file (ascending image id), DataError naming the field."""
    doc = read_json(path, "json")
    categories = _records(doc, "categories", path)
    images = _records(doc, "images", path)
    annotations = _records(doc, "annotations", path)
    if not categories:
        raise DataError(path, "categories", "empty: a detection dataset needs at least one category")
    if not images:
        raise DataError(path, "images", "empty: the split has no image")

    cats: dict[int, tuple[int, str]] = {}  # category id -> (index in the file, name)
    for i, c in enumerate(categories):
        cid = _int_field(c, f"categories[{i}]", "id", path)
        name = _str_field(c, f"categories[{i}]", "name", path)
        if cid in cats:
            raise DataError(path, f"categories[{i}].id", f"duplicate category id {cid} "
                                                         f"(also categories[{cats[cid][0]}])")
        cats[cid] = (i, name)
    cat_ids = tuple(sorted(cats))
    label_of = {cid: k for k, cid in enumerate(cat_ids)}

    where_image: dict[int, int] = {}  # image id -> index in the file
    for i, im in enumerate(images):
        iid = _int_field(im, f"images[{i}]", "id", path)
        name = _str_field(im, f"images[{i}]", "file_name", path)
        for key in ("height", "width"):
            _int_field(im, f"images[{i}]", key, path, required=False, positive=True)
        if iid in where_image:
            raise DataError(path, f"images[{i}].id", f"duplicate image id {iid} "
                                                     f"(also images[{where_image[iid]}])")
        where_image[iid] = i

    per_image: dict[int, list[tuple[list, int]]] = {iid: [] for iid in where_image}
    for i, a in enumerate(annotations):
        where = f"annotations[{i}]"
        iid = _int_field(a, where, "image_id", path)
        if iid not in where_image:
            raise DataError(path, f"{where}.image_id", f"unknown image {iid} (no images[] record with it)")
        cid = _int_field(a, where, "category_id", path)
        if cid not in label_of:
            raise DataError(path, f"{where}.category_id", f"unknown category {cid} (categories: "
                                                          f"{', '.join(map(str, cat_ids[:10]))}"
                                                          f"{', ...' if len(cat_ids) > 10 else ''})")
        bbox = a.get("bbox")
        if bbox is None:
            raise DataError(path, f"{where}.bbox", "missing")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise DataError(path, f"{where}.bbox", f"expected 4 numbers [x, y, w, h], got {bbox!r}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise DataError(path, f"{where}.bbox", f"expected width and height >= 0, got {bbox!r}")
        crowd = a.get("iscrowd", 0)
        if not _is_int(crowd) or crowd not in (0, 1):
            raise DataError(path, f"{where}.iscrowd", f"expected 0 or 1, got {crowd!r}")
        if not crowd:
            per_image[iid].append((bbox, label_of[cid]))

    order = sorted(where_image)
    counts = np.array([len(per_image[iid]) for iid in order], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    flat = [entry for iid in order for entry in per_image[iid]]
    xywh = np.array([b for b, _ in flat], dtype=np.float64).reshape(-1, 4)
    # x0, y0, x1, y1 summed in float64; float32 (the sample's dtype) and int32 halve what workers receive
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32)
    labels = np.array([lab for _, lab in flat], dtype=np.int32)
    recs = [images[where_image[iid]] for iid in order]
    return {
        "cat_ids": cat_ids,
        "classes": tuple(cats[cid][1] for cid in cat_ids),
        "image_ids": np.array(order, dtype=np.int64),
        "file_names": [r["file_name"] for r in recs],
        "record_index": np.array([where_image[iid] for iid in order], dtype=np.int64),
        "sizes": np.array([[r.get("height", 0), r.get("width", 0)] for r in recs], dtype=np.int64),
        "offsets": offsets,
        "boxes": boxes,
        "labels": labels,
    }


def _read_stored_pixels(path: Path) -> np.ndarray:
    """``mtvision.data.io.read_image``, but with the pixels as stored: COCO's boxes ignore EXIF
    orientation (module docstring), which ``cv2.imread`` would otherwise apply."""
    if not path.is_file():
        raise DataError(path, "image", "file not found")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise DataError(path, "image", "cannot decode the image (corrupt or not an image file)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


@DATASETS.register("coco")
class CocoDetection(RawDataset):
    """A COCO-format detection dataset (module docstring for the layout, the sample and the crowd rule).

    Args:
        root: folder holding ``annotations/`` and the image folders.
        split: ``train``, ``val``, ... (``instances_{split}.json`` or ``instances_{split}2017.json``).
        tasks: must be ``("det",)``: COCO-format files hold boxes only; any other task is a ConfigError
            naming ``data.tasks``.
        num_classes: the number of categories (``data.num_classes``); None = whatever the file lists. A
            different count is a ConfigError naming ``data.num_classes`` and the annotation file.
        transform, mean, std, seed, skip_bad: see :class:`~mtvision.data.sample.RawDataset`.

    Attributes: ``classes`` (category names in label order), ``cat_ids`` (the COCO category id of each
    label), ``image_ids`` (COCO id of each sample), ``num_classes``, ``ann_file``, ``image_dir``.

    The annotation file is parsed once, in the constructor: a malformed one raises
    :class:`~mtvision.data.sample.DataError` naming the file and the field with its index
    (``annotations[12].bbox``, ``images[2].file_name``, ...). A missing or undecodable image raises
    DataError naming the image when its sample is read (with ``skip_bad`` the sample is skipped and
    counted instead).
    """

    config_name = "coco"

    def __init__(self, root, split: str = "train", tasks: Sequence[str] = COCO_TASKS,
                 num_classes: Optional[int] = None, transform=None,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                 seed: int = 0, skip_bad: bool = False):
        super().__init__(transform=transform, mean=mean, std=std, seed=seed, skip_bad=skip_bad)
        self.root = Path(root).expanduser()
        self.split = str(split)
        self.tasks = tuple(tasks)
        unknown = [t for t in self.tasks if t not in COCO_TASKS]
        if unknown or not self.tasks:
            raise ConfigError(f"data.tasks: a COCO-format dataset has labels for {', '.join(COCO_TASKS)} "
                              f"(boxes + labels) only, got {list(self.tasks)}")
        if not self.root.is_dir():
            raise ConfigError(f"data.root: dataset folder not found: {self.root}")
        self.ann_file, self.image_dir = coco_paths(self.root, self.split)
        parsed = _parse(self.ann_file)
        if num_classes is not None and int(num_classes) != len(parsed["classes"]):
            raise ConfigError(f"data.num_classes: {num_classes} classes, but {self.ann_file} lists "
                              f"{len(parsed['classes'])} categories")
        self.num_classes = len(parsed["classes"])
        self.classes: tuple[str, ...] = parsed["classes"]
        self.cat_ids: tuple[int, ...] = parsed["cat_ids"]
        self.image_ids: np.ndarray = parsed["image_ids"]
        self._file_names: list[str] = parsed["file_names"]
        self._record_index: np.ndarray = parsed["record_index"]
        self._sizes: np.ndarray = parsed["sizes"]
        self._offsets: np.ndarray = parsed["offsets"]
        self._boxes: np.ndarray = parsed["boxes"]
        self._labels: np.ndarray = parsed["labels"]

    @classmethod
    def from_config(cls, data, split: str, transform, seed: int) -> "CocoDetection":
        """The ``split`` of ``data`` (a DataConfig); ``data.kwargs`` takes no COCO option."""
        cls.check_config_kwargs(data.kwargs)
        return cls(data.root, split, tasks=tuple(data.tasks), num_classes=data.num_classes,
                   transform=transform, mean=tuple(data.mean), std=tuple(data.std), seed=seed,
                   skip_bad=data.skip_bad)

    def __len__(self) -> int:
        return len(self._file_names)

    def image_path(self, index: int) -> Path:
        """The image file of sample ``index``."""
        return self.image_dir / self._file_names[index]

    def read_raw(self, index: int) -> dict:
        path = self.image_path(index)
        image = _read_stored_pixels(path)
        h, w = image.shape[:2]
        eh, ew = (int(v) for v in self._sizes[index])
        if (eh and eh != h) or (ew and ew != w):
            raise DataError(path, "image", f"decoded size {h}x{w} differs from the height x width "
                                           f"{eh or h}x{ew or w} of images[{self._record_index[index]}] in "
                                           f"{self.ann_file}")
        lo, hi = self._offsets[index], self._offsets[index + 1]
        boxes = self._boxes[lo:hi].copy()
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return {
            "image": image,
            "boxes": boxes[keep],
            "labels": self._labels[lo:hi][keep].astype(np.int64),
            "meta": {"source": str(path), "files": [str(path), str(self.ann_file)], "size": (h, w),
                     "image_id": int(self.image_ids[index]), "file_name": self._file_names[index]},
        }
