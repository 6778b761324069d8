"""NYUv2 (Silberman et al., ECCV 2012) with the 13-class labels of Couprie et al. (ICLR 2013), depth and
surface normals, read from one of two layouts:

``npy`` -- the preprocessed layout of MTAN / LibMTL (795 train and 654 val images at 288x384)::

    root/{train,val}/image/{i}.npy    [H, W, 3] float in [0, 1] (or uint8)
    root/{train,val}/label/{i}.npy    [H, W] 13-class ids 0..12, -1 = ignore (float or int)
    root/{train,val}/depth/{i}.npy    [H, W] or [H, W, 1] metres, 0 = invalid
    root/{train,val}/normal/{i}.npy   [H, W, 3] in [-1, 1], 0 = invalid

``mat`` -- the official release (1449 images at 480x640)::

    root/nyu_depth_v2_labeled.mat     MATLAB v7.3 (HDF5): images, depths, labels (894 classes, 0 = unlabelled)
    root/splits.mat                   trainNdxs (795) / testNdxs (654), 1-based
    classMapping40.mat                894 -> 40 classes (Gupta et al., CVPR 2013), field ``mapClass``;
                                      not redistributable here: give its path (``class_mapping40``) or put
                                      it in root
    normals_dir/{index:04d}.png       optional surface normals (see ``normals_pattern``), one file per image
                                      of the .mat (``index`` 0-based), ``(n+1)/2*255`` RGB PNG or .npy/.exr

The 40 -> 13 mapping ships with the package (``resources/nyuv2_40_to_13.json``, the table of
ankurhanda/nyuv2-meta-data ``class13Mapping.mat``). Split ``train`` uses ``trainNdxs``, ``val`` or ``test``
uses ``testNdxs``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..registry import DATASETS
from ..config import ConfigError
from .dense_io import NORMAL_EXTS, check_shape, finish_normal, read_normal, seg_from_array
from .io import read_npy
from .sample import IGNORE_INDEX, DataError, RawDataset

__all__ = ["NYUV2_CLASSES", "NYUv2", "EIGEN_CROP", "eigen_crop_box", "apply_eigen_crop", "nyu40_to_13_lut",
           "load_class_mapping40"]

#: The 13 classes (Couprie et al. 2013) in id order 0..12.
NYUV2_CLASSES = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa",
                 "table", "tv", "wall", "window")

#: Eigen et al.'s evaluation crop at 480x640: rows [45, 471), columns [41, 601).
EIGEN_CROP = (45, 471, 41, 601)
_EIGEN_SIZE = (480, 640)

_TASKS = ("seg", "depth", "normal")
_MAT_SPLITS = {"train": "trainNdxs", "val": "testNdxs", "test": "testNdxs"}
_NPY_DIRS = {"seg": "label", "depth": "depth", "normal": "normal"}
_RESOURCE = Path(__file__).resolve().parent / "resources" / "nyuv2_40_to_13.json"


def eigen_crop_box(size: Sequence[int]) -> tuple[int, int, int, int]:
    """``(row0, row1, col0, col1)`` of the Eigen crop scaled to an image of ``size = (H, W)``."""
    h, w = int(size[0]), int(size[1])
    r0, r1, c0, c1 = EIGEN_CROP
    sy, sx = h / _EIGEN_SIZE[0], w / _EIGEN_SIZE[1]
    return (int(round(r0 * sy)), int(round(r1 * sy)), int(round(c0 * sx)), int(round(c1 * sx)))


def apply_eigen_crop(depth: np.ndarray) -> np.ndarray:
    """A copy of ``depth`` with every pixel outside the (scaled) Eigen crop set to 0 (invalid)."""
    r0, r1, c0, c1 = eigen_crop_box(depth.shape[:2])
    out = np.zeros_like(depth)
    out[r0:r1, c0:c1] = depth[r0:r1, c0:c1]
    return out


def nyu40_to_13_lut() -> np.ndarray:
    """``uint8 [41]``: 40-class id (1..40; 0 = unlabelled) -> 0-based 13-class id, 255 for unlabelled."""
    table = json.loads(_RESOURCE.read_text())["map40to13"]
    lut = np.full(41, IGNORE_INDEX, dtype=np.uint8)
    lut[1:] = np.asarray(table, dtype=np.uint8) - 1
    return lut


def _load_mat_field(path: Path, name: str) -> np.ndarray:
    """One numeric variable of a MATLAB file (v5 through scipy, v7.3 through h5py), as a numpy array in
    MATLAB's axis order; ``DataError`` naming the file and the field otherwise."""
    if not path.is_file():
        raise DataError(path, name, "file not found")
    import scipy.io

    try:
        data = scipy.io.loadmat(str(path), variable_names=[name])
    except NotImplementedError:  # v7.3: HDF5
        import h5py

        try:
            with h5py.File(path, "r") as f:
                if name not in f:
                    raise DataError(path, name, f"variable not found (the file holds: {sorted(f.keys())})")
                return np.asarray(f[name][()]).T
        except OSError as e:
            raise DataError(path, name, f"cannot read the MATLAB v7.3 file ({e})") from e
    except Exception as e:  # scipy raises ValueError, TypeError, OSError, MatReadError on damaged files
        raise DataError(path, name, f"cannot read the MATLAB file ({type(e).__name__}: {e})") from e
    if name not in data:
        keys = sorted(k for k in data if not k.startswith("__"))
        raise DataError(path, name, f"variable not found (the file holds: {keys})")
    return np.asarray(data[name])


def load_class_mapping40(path) -> np.ndarray:
    """The 894 -> 40 mapping ``mapClass`` of ``classMapping40.mat`` (Gupta et al.) as ``int64 [K]``: entry
    ``k - 1`` is the 40-class id (0..40) of raw class ``k``."""
    path = Path(path)
    m = _load_mat_field(path, "mapClass")
    try:
        m = np.asarray(m, dtype=np.float64).ravel()
    except (TypeError, ValueError) as e:
        raise DataError(path, "mapClass", f"expected a numeric vector ({e})") from e
    if m.size == 0 or not np.isfinite(m).all() or (m != np.rint(m)).any() or m.min() < 0 or m.max() > 40:
        raise DataError(path, "mapClass", "expected a vector of integer 40-class ids in 0..40")
    return m.astype(np.int64)


def _resolve(root: Path, path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


@DATASETS.register("nyuv2")
class NYUv2(RawDataset):
    """NYUv2 with 13-class segmentation, metric depth and surface normals (module doc for the layouts).

    Args:
        root: dataset folder.
        split: ``train`` / ``val`` (``npy``: the sub-folder name; ``mat``: ``val`` and ``test`` both mean
            ``testNdxs``).
        tasks: which labels to load, any of ``seg``, ``depth``, ``normal``.
        transform, mean, std, seed, skip_bad: see :class:`~mtvision.data.sample.RawDataset`.
        layout: ``auto`` (``npy`` when ``root/split/image`` exists, else ``mat``), ``npy`` or ``mat``.
        eigen_crop: set depth outside Eigen's crop (rows 45:471, columns 41:601 at 480x640, scaled to the
            stored size) to 0, so depth metrics follow the Eigen evaluation protocol.
        mat_file, splits_file: the official files (relative to ``root`` unless absolute).
        class_mapping40: path of ``classMapping40.mat`` (default ``root/classMapping40.mat``); needed for
            ``seg`` with the ``mat`` layout.
        normals_dir: folder of normal maps for the ``mat`` layout (default ``root/normals`` when it exists).
        normals_pattern: file stem of image ``index`` (0-based row of the .mat) in ``normals_dir``, a
            ``str.format`` pattern with ``index`` and ``number`` (= index + 1, as in ``splits.mat``); the
            extensions ``.png``, ``.npy``, ``.exr`` are tried in that order.

    Structural problems (missing folder or file, unknown option) raise ``ConfigError``; an unreadable or
    malformed sample raises ``DataError`` naming the file and the field (``None`` with ``skip_bad``).
    """

    classes = NYUV2_CLASSES
    num_classes = len(NYUV2_CLASSES)

    def __init__(self, root, split: str = "train", tasks: Sequence[str] = _TASKS, transform=None,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                 seed: int = 0, skip_bad: bool = False, layout: str = "auto", eigen_crop: bool = False,
                 mat_file: str = "nyu_depth_v2_labeled.mat", splits_file: str = "splits.mat",
                 class_mapping40: Optional[str] = None, normals_dir: Optional[str] = None,
                 normals_pattern: str = "{index:04d}"):
        super().__init__(transform=transform, mean=mean, std=std, seed=seed, skip_bad=skip_bad)
        self.root = Path(root).expanduser()
        self.split = str(split)
        self.tasks = tuple(tasks)
        unknown = [t for t in self.tasks if t not in _TASKS]
        if unknown:
            raise ConfigError(f"data.tasks: NYUv2 has no task(s) {unknown} "
                              f"(choose from: {', '.join(_TASKS)})")
        if layout not in ("auto", "npy", "mat"):
            raise ConfigError(f"data.kwargs.layout: expected 'auto', 'npy' or 'mat', got {layout!r}")
        if not isinstance(eigen_crop, bool):
            raise ConfigError(f"data.kwargs.eigen_crop: expected true or false, got {eigen_crop!r}")
        self.eigen_crop = eigen_crop
        if not self.root.is_dir():
            raise ConfigError(f"data.root: NYUv2 folder not found: {self.root}")
        self.mat_file = _resolve(self.root, mat_file)
        if layout == "auto":
            if (self.root / self.split / "image").is_dir():
                layout = "npy"
            elif self.mat_file.is_file():
                layout = "mat"
            else:
                raise ConfigError(f"data.root: {self.root} holds neither the preprocessed layout "
                                  f"({self.root / self.split / 'image'}/<i>.npy) nor the official "
                                  f"{self.mat_file.name}")
        self.layout = layout
        self._h5file = None
        self._h5pid: Optional[int] = None
        if layout == "npy":
            self._init_npy()
        else:
            self._init_mat(_resolve(self.root, splits_file), class_mapping40, normals_dir, normals_pattern)

    # ------------------------------------------------------------------------------------------------
    # npy layout

    def _init_npy(self) -> None:
        base = self.root / self.split
        image_dir = base / "image"
        if not image_dir.is_dir():
            raise ConfigError(f"data.root: split {self.split!r} of the preprocessed NYUv2 layout not found: "
                              f"{image_dir}")
        for t in self.tasks:
            d = base / _NPY_DIRS[t]
            if not d.is_dir():
                raise ConfigError(f"data.tasks: task {t!r} is requested but its folder {d} does not exist")
        ids = []
        for name in os.listdir(image_dir):
            m = re.fullmatch(r"(\d+)\.npy", name)
            if m:
                ids.append(int(m.group(1)))
        if not ids:
            raise ConfigError(f"data.root: no <i>.npy images in {image_dir}")
        self._ids = sorted(ids)

    def _read_npy_sample(self, index: int) -> dict:
        n = self._ids[index]
        base = self.root / self.split
        img_path = base / "image" / f"{n}.npy"
        image = read_npy(img_path, "image")
        if image.ndim != 3 or image.shape[2] != 3:
            raise DataError(img_path, "image", f"expected [H, W, 3] RGB, got shape {tuple(image.shape)}")
        if image.dtype.kind == "f":
            image = image.astype(np.float32, copy=False)
            lo, hi = float(image.min()), float(image.max())
            if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-3 or hi > 1.0 + 1e-3:
                raise DataError(img_path, "image", f"expected floats in [0, 1], got values in [{lo}, {hi}]")
            if lo < 0.0 or hi > 1.0:
                image = np.clip(image, 0.0, 1.0)
        elif image.dtype != np.uint8:
            raise DataError(img_path, "image", f"expected float in [0, 1] or uint8, got dtype {image.dtype}")
        h, w = image.shape[:2]
        raw: dict = {"image": image}
        files = [str(img_path)]
        if "seg" in self.tasks:
            p = base / "label" / f"{n}.npy"
            seg = seg_from_array(read_npy(p, "seg"), p, self.num_classes, extra_ignore=-1)
            check_shape(seg, (h, w), p, "seg")
            raw["seg"] = seg
            files.append(str(p))
        if "depth" in self.tasks:
            p = base / "depth" / f"{n}.npy"
            depth = read_npy(p, "depth")
            if depth.ndim == 3 and depth.shape[2] == 1:
                depth = depth[..., 0]
            check_shape(depth, (h, w), p, "depth")
            if depth.dtype.kind not in "fiu":
                raise DataError(p, "depth", f"expected float metres, got dtype {depth.dtype}")
            depth = depth.astype(np.float32, copy=False)
            if not np.isfinite(depth).all() or (depth < 0).any():
                raise DataError(p, "depth", "expected finite metres >= 0 (0 = invalid)")
            raw["depth"] = depth
            files.append(str(p))
        if "normal" in self.tasks:
            p = base / "normal" / f"{n}.npy"
            normal = finish_normal(read_npy(p, "normal"), p, inplace=True)
            check_shape(normal, (h, w, 3), p, "normal")
            raw["normal"] = normal
            files.append(str(p))
        raw["meta"] = {"source": str(img_path), "files": files, "size": (h, w), "index": n}
        return raw

    # ------------------------------------------------------------------------------------------------
    # official .mat layout

    def _init_mat(self, splits_file: Path, class_mapping40, normals_dir, normals_pattern) -> None:
        if self.split not in _MAT_SPLITS:
            raise ConfigError(f"data.train_split / data.val_split: the official NYUv2 split is 'train' or "
                              f"'val' (= 'test'), got {self.split!r}")
        if not self.mat_file.is_file():
            raise ConfigError(f"data.kwargs.mat_file: file not found: {self.mat_file}")
        self.splits_file = splits_file
        if not splits_file.is_file():
            raise ConfigError(f"data.kwargs.splits_file: file not found: {splits_file}")
        import h5py

        try:
            with h5py.File(self.mat_file, "r") as f:
                shapes = {}
                for key in ("images", "depths", "labels"):
                    if key not in f:
                        raise DataError(self.mat_file, key, f"variable not found (the file holds: "
                                                            f"{sorted(f.keys())})")
                    shapes[key] = tuple(f[key].shape)
        except DataError:
            raise
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise DataError(self.mat_file, "file", f"cannot open as a MATLAB v7.3 (HDF5) file ({e})") from e
        im = shapes["images"]
        if len(im) != 4 or im[1] != 3:
            raise DataError(self.mat_file, "images",
                            f"expected [N, 3, W, H] (MATLAB's H x W x 3 x N), got {im}")
        for key in ("depths", "labels"):
            if shapes[key] != (im[0], im[2], im[3]):
                raise DataError(self.mat_file, key, f"expected shape {(im[0], im[2], im[3])} (the images'), "
                                                    f"got {shapes[key]}")
        self._num_mat, self._mat_size = im[0], (im[3], im[2])
        field = _MAT_SPLITS[self.split]
        idx = _load_mat_field(splits_file, field)
        try:
            idx = np.asarray(idx, dtype=np.float64).ravel()
        except (TypeError, ValueError) as e:
            raise DataError(splits_file, field, f"expected a numeric vector ({e})") from e
        if idx.size == 0 or (idx != np.rint(idx)).any() or idx.min() < 1 or idx.max() > self._num_mat:
            raise DataError(splits_file, field, f"expected 1-based image indices in 1..{self._num_mat}")
        self._indices = idx.astype(np.int64) - 1
        self._lut = None
        if "seg" in self.tasks:
            path = (_resolve(self.root, class_mapping40) if class_mapping40 is not None
                    else self.root / "classMapping40.mat")
            if not path.is_file():
                raise ConfigError(f"data.kwargs.class_mapping40: the 894 -> 40 class mapping "
                                  f"classMapping40.mat (Gupta et al.) was not found at {path}; give its path")
            map40 = load_class_mapping40(path)
            lut = np.full(len(map40) + 1, IGNORE_INDEX, dtype=np.uint8)
            lut[1:] = nyu40_to_13_lut()[map40]
            self._lut = lut
            self.class_mapping40 = path
        self.normals_dir = None
        self.normals_pattern = normals_pattern
        if "normal" in self.tasks:
            d = (_resolve(self.root, normals_dir) if normals_dir is not None else self.root / "normals")
            if not d.is_dir():
                raise ConfigError(f"data.kwargs.normals_dir: task 'normal' is requested (data.tasks) but the "
                                  f"normals folder {d} does not exist (the official release has no normals)")
            try:
                normals_pattern.format(index=0, number=1)
            except (KeyError, IndexError, ValueError) as e:
                raise ConfigError(f"data.kwargs.normals_pattern: bad pattern {normals_pattern!r} ({e}); use "
                                  f"the fields {{index}} and {{number}}") from e
            self.normals_dir = d

    def _h5(self):
        """The .mat opened once per process (a worker never inherits an open handle: see ``__getstate__``)."""
        pid = os.getpid()
        if self._h5file is None or self._h5pid != pid:
            import h5py

            try:
                self._h5file = h5py.File(self.mat_file, "r")
            except (OSError, KeyError, ValueError, RuntimeError) as e:
                raise DataError(self.mat_file, "file",
                                f"cannot open as a MATLAB v7.3 (HDF5) file ({e})") from e
            self._h5pid = pid
        return self._h5file

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_h5file"], state["_h5pid"] = None, None
        return state

    def _normal_path(self, i: int) -> Path:
        stem = self.normals_pattern.format(index=i, number=i + 1)
        for ext in NORMAL_EXTS:
            p = self.normals_dir / f"{stem}{ext}"
            if p.is_file():
                return p
        raise DataError(self.normals_dir / f"{stem}.png", "normal",
                        f"normal map of image index {i} not found (also looked for {stem}.npy, {stem}.exr)")

    def _read_mat_sample(self, index: int) -> dict:
        i = int(self._indices[index])
        f = self._h5()
        where = f"image index {i} (number {i + 1})"
        try:
            image = np.ascontiguousarray(f["images"][i].transpose(2, 1, 0))
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise DataError(self.mat_file, "images", f"cannot read {where} ({e})") from e
        if image.dtype != np.uint8:
            raise DataError(self.mat_file, "images", f"expected uint8 RGB, got dtype {image.dtype}")
        h, w = image.shape[:2]
        raw: dict = {"image": image}
        files = [str(self.mat_file)]
        if "seg" in self.tasks:
            try:
                labels = f["labels"][i].T
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise DataError(self.mat_file, "labels", f"cannot read {where} ({e})") from e
            if labels.dtype.kind not in "iu":
                labels = seg_from_array(labels, self.mat_file, 1 << 30, field="labels").astype(np.int64)
            if labels.min() < 0 or labels.max() >= len(self._lut):
                bad = np.unique(labels[(labels < 0) | (labels >= len(self._lut))])[:5].tolist()
                raise DataError(self.mat_file, "labels", f"{where}: label value(s) {bad} out of range: "
                                                         f"expected 0..{len(self._lut) - 1} (0 = unlabelled)")
            raw["seg"] = self._lut[labels]
            files.append(str(self.class_mapping40))
        if "depth" in self.tasks:
            try:
                depth = f["depths"][i].T.astype(np.float32)
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise DataError(self.mat_file, "depths", f"cannot read {where} ({e})") from e
            if not np.isfinite(depth).all() or (depth < 0).any():
                raise DataError(self.mat_file, "depths", f"{where}: expected finite metres >= 0")
            raw["depth"] = np.ascontiguousarray(depth)
        if "normal" in self.tasks:
            p = self._normal_path(i)
            normal = read_normal(p)
            check_shape(normal, (h, w, 3), p, "normal", f"the image's, {self.mat_file.name} index {i}")
            raw["normal"] = normal
            files.append(str(p))
        raw["meta"] = {"source": str(self.mat_file), "files": files, "size": (h, w), "index": i}
        return raw

    # ------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids) if self.layout == "npy" else len(self._indices)

    def read_raw(self, index: int) -> dict:
        raw = self._read_npy_sample(index) if self.layout == "npy" else self._read_mat_sample(index)
        if self.eigen_crop and "depth" in raw:
            raw["depth"] = apply_eigen_crop(raw["depth"])
            raw["meta"]["eigen_crop"] = eigen_crop_box(raw["depth"].shape)
        return raw

    config_name = "nyuv2"

    @classmethod
    def from_config(cls, data, split: str, transform, seed: int) -> "NYUv2":
        """The ``split`` of ``data`` (a DataConfig). ``data.kwargs`` may hold ``layout``, ``eigen_crop``
        (applied to the evaluation split ``data.val_split`` only, never to training), ``mat_file``,
        ``splits_file``, ``class_mapping40``, ``normals_dir``, ``normals_pattern``."""
        cls.check_config_kwargs(data.kwargs)
        kwargs = dict(data.kwargs)
        for key in ("mat_file", "splits_file", "class_mapping40", "normals_dir", "normals_pattern", "layout"):
            if key in kwargs and not isinstance(kwargs[key], str):
                raise ConfigError(f"data.kwargs.{key}: expected a string, got {kwargs[key]!r}")
        if data.num_classes != cls.num_classes:
            raise ConfigError(f"data.num_classes: NYUv2 has {cls.num_classes} classes, "
                              f"got {data.num_classes}")
        eigen = kwargs.pop("eigen_crop", False)
        if not isinstance(eigen, bool):
            raise ConfigError(f"data.kwargs.eigen_crop: expected true or false, got {eigen!r}")
        eigen = eigen and split == data.val_split and split != data.train_split
        return cls(data.root, split, tasks=tuple(data.tasks), transform=transform, mean=tuple(data.mean),
                   std=tuple(data.std), seed=seed, skip_bad=data.skip_bad, eigen_crop=eigen, **kwargs)
