"""``FolderDataset``: your own images with any subset of segmentation, depth and normal label maps and
detection boxes.

Layout (``split`` is ``data.train_split`` / ``data.val_split``)::

    root/classes.txt                 optional: one class name per line, line k = class id k
    root/{split}/images/<stem>.png   (or .jpg / .jpeg) RGB images
    root/{split}/seg/<stem>.png      8-bit or 16-bit class ids, 255 = ignore
    root/{split}/depth/<stem>.png    16-bit, metres = value / depth_scale (default 1000: mm), 0 = invalid
                      <stem>.npy     or float metres [H, W] / [H, W, 1], 0 = invalid
    root/{split}/normal/<stem>.png   8-bit (or 16-bit) RGB of (n + 1) / 2 * 255, R, G, B = x, y, z in the
                                     camera frame (x right, y down, z forward); 0 in all channels = invalid
                       <stem>.npy    or float [H, W, 3] unit vectors (0 = invalid); .exr the same through
                                     OpenCV when its build reads OpenEXR
    root/{split}/det/<stem>.txt      boxes, one per line: ``class_id x1 y1 x2 y2`` in the image's pixels
                                     (x right, y down, pixel edges); an empty file = no object; blank
                                     lines and ``#`` comments ignored

Class ids (segmentation and detection alike) are ``0 .. num_classes - 1``. A box may reach at most one
pixel past the image (it is clipped there); one further out, or with ``x2 <= x1`` / ``y2 <= y1``, is a
``DataError`` naming the file and the line.

Only the label folders of the requested tasks are read; a requested task without its folder is a
``ConfigError``; an image without its label file is a ``DataError`` naming the expected path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..registry import DATASETS
from ..config import ConfigError
from .dense_io import DEPTH_EXTS, NORMAL_EXTS, check_shape, read_depth, read_normal, seg_from_array
from .io import read_image, read_label_png
from .sample import DataError, RawDataset

__all__ = ["FolderDataset", "IMAGE_EXTS", "read_box_file"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
_TASK_EXTS = {"seg": (".png",), "depth": DEPTH_EXTS, "normal": NORMAL_EXTS, "det": (".txt",)}


def _index_folder(folder: Path, exts: Sequence[str]) -> dict[str, Path]:
    """stem -> file for the files of ``folder`` with one of ``exts`` (case-insensitive); when a stem has
    several, the earliest extension in ``exts`` wins."""
    found: dict[str, tuple[int, Path]] = {}
    for entry in os.scandir(folder):
        stem, ext = os.path.splitext(entry.name)
        ext = ext.lower()
        if ext in exts and entry.is_file():
            rank = exts.index(ext)
            if stem not in found or rank < found[stem][0]:
                found[stem] = (rank, Path(entry.path))
    return {stem: p for stem, (_, p) in found.items()}


def read_box_file(path: Path, size: tuple[int, int], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``boxes`` float32 ``[N, 4]`` and ``labels`` int64 ``[N]`` from a ``det/<stem>.txt`` file (module doc),
    clipped to the image ``size = (H, W)``; DataError naming the file and the line."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, "det", f"cannot read the box file ({e})") from e
    h, w = size
    boxes, labels = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        try:
            if len(fields) != 5:
                raise ValueError
            cls, coords = int(fields[0]), [float(v) for v in fields[1:]]
        except ValueError:
            raise DataError(path, f"det line {n}", f"expected 'class_id x1 y1 x2 y2', got {line!r}") from None
        x1, y1, x2, y2 = coords
        if not 0 <= cls < num_classes:
            raise DataError(path, f"det line {n}", f"class id {cls} outside [0, {num_classes})")
        if not all(np.isfinite(coords)) or x2 <= x1 or y2 <= y1:
            raise DataError(path, f"det line {n}", f"expected x1 < x2 and y1 < y2, got {coords}")
        if x1 < -1 or y1 < -1 or x2 > w + 1 or y2 > h + 1:
            raise DataError(path, f"det line {n}", f"box {coords} lies outside the {w}x{h} image")
        boxes.append([min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h)])
        labels.append(cls)
    return np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64)


def read_class_names(path: Path) -> tuple[str, ...]:
    """Class names from ``classes.txt``: one per line, blank lines and surrounding spaces ignored."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"data.root: cannot read the class names {path} ({e})") from e
    names = tuple(s.strip() for s in lines if s.strip())
    if not names:
        raise ConfigError(f"data.root: {path} lists no class names")
    return names


@DATASETS.register("custom")
class FolderDataset(RawDataset):
    """A folder of images plus label maps (module doc for the layout and the encodings).

    Args:
        root: dataset folder.
        split: sub-folder (``train``, ``val``, ...).
        tasks: labels to load, any of ``seg``, ``depth``, ``normal``, ``det``.
        num_classes: number of classes of ``seg`` / ``det`` (default: the lines of ``root/classes.txt``).
        depth_scale: a depth PNG's value per metre (1000: millimetres).
        transform, mean, std, seed, skip_bad: see :class:`~mtvision.data.sample.RawDataset`.
    """

    TASKS = ("seg", "depth", "normal", "det")

    def __init__(self, root, split: str = "train", tasks: Sequence[str] = ("seg", "depth", "normal"),
                 num_classes: Optional[int] = None, transform=None,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                 seed: int = 0, skip_bad: bool = False, depth_scale: float = 1000.0):
        super().__init__(transform=transform, mean=mean, std=std, seed=seed, skip_bad=skip_bad)
        self.root = Path(root).expanduser()
        self.split = str(split)
        self.tasks = tuple(tasks)
        unknown = [t for t in self.tasks if t not in self.TASKS]
        if unknown:
            raise ConfigError(f"data.tasks: the custom dataset has no task(s) {unknown} "
                              f"(choose from: {', '.join(self.TASKS)})")
        if isinstance(depth_scale, bool) or not isinstance(depth_scale, (int, float)) or not depth_scale > 0:
            raise ConfigError(f"data.kwargs.depth_scale: expected a number > 0, got {depth_scale!r}")
        self.depth_scale = float(depth_scale)
        if not self.root.is_dir():
            raise ConfigError(f"data.root: dataset folder not found: {self.root}")
        classes_txt = self.root / "classes.txt"
        names = read_class_names(classes_txt) if classes_txt.is_file() else None
        if num_classes is None:
            if names is None and ("seg" in self.tasks or "det" in self.tasks):
                raise ConfigError(f"data.num_classes: give the number of classes or list their names in "
                                  f"{classes_txt}")
            num_classes = len(names) if names is not None else 0
        elif names is not None and len(names) != num_classes:
            raise ConfigError(f"data.num_classes: {num_classes} classes, but {classes_txt} lists "
                              f"{len(names)} names")
        self.num_classes = int(num_classes)
        self.classes = names if names is not None else tuple(str(i) for i in range(self.num_classes))

        base = self.root / self.split
        image_dir = base / "images"
        if not image_dir.is_dir():
            raise ConfigError(f"data.root: the images of split {self.split!r} are expected in {image_dir}, "
                              f"which does not exist")
        images = _index_folder(image_dir, IMAGE_EXTS)
        if not images:
            raise ConfigError(f"data.root: no images ({', '.join(IMAGE_EXTS)}) in {image_dir}")
        dups = sorted({e.name for e in os.scandir(image_dir)
                       if os.path.splitext(e.name)[1].lower() in IMAGE_EXTS}
                      - {p.name for p in images.values()})
        if dups:
            raise ConfigError(f"data.root: {image_dir} holds several images with the same name: {dups[:5]}")
        self._stems = sorted(images)
        self._images = [images[s] for s in self._stems]
        self._labels: dict[str, dict[str, Path]] = {}
        for t in self.tasks:
            d = base / t
            if not d.is_dir():
                raise ConfigError(f"data.tasks: task {t!r} is requested but its folder {d} does not exist")
            self._labels[t] = _index_folder(d, _TASK_EXTS[t])

    def __len__(self) -> int:
        return len(self._stems)

    def _label_path(self, task: str, stem: str, img_path: Path) -> Path:
        p = self._labels[task].get(stem)
        if p is None:
            exts = _TASK_EXTS[task]
            expected = self.root / self.split / task / f"{stem}{exts[0]}"
            also = f" (or {', '.join(stem + e for e in exts[1:])})" if len(exts) > 1 else ""
            raise DataError(expected, task, f"label file not found{also} for image {img_path}")
        return p

    def read_raw(self, index: int) -> dict:
        stem, img_path = self._stems[index], self._images[index]
        image = read_image(img_path)
        h, w = image.shape[:2]
        raw: dict = {"image": image}
        files = [str(img_path)]
        if "seg" in self.tasks:
            p = self._label_path("seg", stem, img_path)
            seg = seg_from_array(read_label_png(p, "seg"), p, self.num_classes)
            check_shape(seg, (h, w), p, "seg")
            raw["seg"] = seg
            files.append(str(p))
        if "depth" in self.tasks:
            p = self._label_path("depth", stem, img_path)
            depth = read_depth(p, self.depth_scale)
            check_shape(depth, (h, w), p, "depth")
            raw["depth"] = depth
            files.append(str(p))
        if "normal" in self.tasks:
            p = self._label_path("normal", stem, img_path)
            normal = read_normal(p)
            check_shape(normal, (h, w, 3), p, "normal")
            raw["normal"] = normal
            files.append(str(p))
        if "det" in self.tasks:
            p = self._label_path("det", stem, img_path)
            raw["boxes"], raw["labels"] = read_box_file(p, (h, w), self.num_classes)
            files.append(str(p))
        raw["meta"] = {"source": str(img_path), "files": files, "size": (h, w), "stem": stem}
        return raw

    config_name = "custom"

    @classmethod
    def from_config(cls, data, split: str, transform, seed: int) -> "FolderDataset":
        """The ``split`` of ``data`` (a DataConfig); ``data.kwargs`` may hold ``depth_scale``."""
        cls.check_config_kwargs(data.kwargs)
        return cls(data.root, split, tasks=tuple(data.tasks), num_classes=data.num_classes,
                   transform=transform, mean=tuple(data.mean), std=tuple(data.std), seed=seed,
                   skip_bad=data.skip_bad, **dict(data.kwargs))
