"""``SyntheticScenes``: the built-in dataset of procedural indoor scenes with exact labels and no files
(the scenes and their ray casting: ``mtvision.data.synthetic_render``)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..registry import DATASETS
from .synthetic_render import (IMAGENET_MEAN, IMAGENET_STD, SYNTHETIC_CLASSES, make_scene, backproject,
                               instance_boxes, intrinsics_for_size, render_scene)

__all__ = ["SYNTHETIC_CLASSES", "SyntheticScenes", "backproject"]


@DATASETS.register("synthetic")
class SyntheticScenes(Dataset):
    """Procedural indoor scenes with exact dense labels, generated on the fly.

    Sample ``i`` depends only on ``(seed, i)`` (``np.random.default_rng([seed, i])``), never on the
    worker process or the order of access; use different seeds for train and validation.

    Each item is a tensor sample dict: ``image`` float32 ``[3,H,W]`` (normalised with ``mean``/``std``),
    ``seg`` int64 ``[H,W]`` (ids into ``SYNTHETIC_CLASSES``; every pixel is labelled), ``depth`` float32
    ``[1,H,W]`` camera z-depth in metres (> 0 everywhere), ``normal`` float32 ``[3,H,W]`` unit camera-frame
    normals (x right, y down, z forward) facing the camera, ``boxes`` float32 ``[N,4]`` xyxy pixel edges of
    each object with ``>= min_box_pixels`` visible pixels, ``labels`` int64 ``[N]`` class ids, and ``meta``
    (``index``, ``seed``, ``size`` (H, W), ``source``, intrinsics ``fx``, ``fy``, ``cx``, ``cy`` in pixels).
    ``transform`` (a callable on that dict) is applied last.

    Args:
        num_samples: dataset length.
        size: ``(H, W)`` of the images.
        seed: seed of the whole dataset.
        mean, std: per-channel normalisation of the [0, 1] RGB image.
        max_objects: each scene holds 1..max_objects objects (fewer when they don't fit).
        noise_std: std of the Gaussian pixel noise added to the [0, 1] RGB image.
        min_box_pixels: objects with fewer visible pixels get no box.
        transform: optional callable ``sample -> sample``.
    """

    classes = SYNTHETIC_CLASSES

    def __init__(self, num_samples: int, size: Sequence[int] = (128, 160), seed: int = 0,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 max_objects: int = 6, noise_std: float = 0.02, min_box_pixels: int = 16,
                 transform: Callable[[dict], dict] | None = None):
        if num_samples < 0:
            raise ValueError(f"SyntheticScenes: num_samples must be >= 0, got {num_samples}")
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"SyntheticScenes: size must be (H, W) with positive ints, got {size!r}")
        if max_objects < 1:
            raise ValueError(f"SyntheticScenes: max_objects must be >= 1, got {max_objects}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"SyntheticScenes: mean/std must be 3 values with std > 0, got {mean}, {std}")
        self.num_samples = int(num_samples)
        self.size = (int(size[0]), int(size[1]))
        self.seed = int(seed)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self.max_objects = int(max_objects)
        self.noise_std = float(noise_std)
        self.min_box_pixels = int(min_box_pixels)
        self.transform = transform
        self.intrinsics = intrinsics_for_size(self.size)
        h, w = self.size
        i = self.intrinsics
        u = (np.arange(w) + 0.5 - i["cx"]) / i["fx"]
        v = (np.arange(h) + 0.5 - i["cy"]) / i["fy"]
        self._rays = np.stack(np.broadcast_arrays(u[None, :], v[:, None], np.ones((h, w))), axis=0)

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index])

    def _check_index(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"SyntheticScenes: index {index} out of range [0, {self.num_samples})")
        return index

    def scene(self, index: int) -> dict:
        """Raw parameters of scene ``index``: ``room_size`` (Lx, Ly, Hc) in metres; ``camera``
        (``position`` [3] world, ``rotation`` R_wc [3,3] world-from-camera, ``yaw``/``pitch``/``roll``,
        ``fx``/``fy``/``cx``/``cy``); ``planes`` (floor, ceiling, 4 walls: ``normal``/``offset`` with
        ``normal . X + offset = 0`` in the world, ``normal_cam``/``offset_cam`` the same in the camera
        frame, normals pointing into the room); ``objects`` (``kind``, ``class_id``, ``center`` (geometric
        centre, world), ``yaw``, and ``half_extents`` (box), ``radius`` (sphere, cylinder),
        ``height`` (cylinder)); ``light``; ``appearance`` (per surface)."""
        return make_scene(self._rng(self._check_index(index)), self.max_objects,
                           self.intrinsics, self.size)

    def render(self, index: int) -> dict:
        """Everything about sample ``index`` as numpy arrays: ``render_scene``'s output plus ``scene``,
        ``rgb`` (with noise, [0, 1]), ``boxes``, ``labels`` and ``box_objects`` (object index per box)."""
        index = self._check_index(index)
        rng = self._rng(index)
        scene = make_scene(rng, self.max_objects, self.intrinsics, self.size)
        out = render_scene(scene, self._rays)
        rgb = out["rgb"].astype(np.float32)
        if self.noise_std > 0:
            rgb += np.float32(self.noise_std) * rng.standard_normal(rgb.shape, dtype=np.float32)
            np.clip(rgb, 0.0, 1.0, out=rgb)
        out["rgb"] = rgb
        boxes, labels, keep = instance_boxes(out["instance"], scene["objects"], self.min_box_pixels)
        out.update(scene=scene, boxes=boxes, labels=labels, box_objects=keep)
        return out

    def __getitem__(self, index) -> dict:
        if isinstance(index, tuple):  # (index, augmentation seed) from the training sampler: no augmentation
            index = index[0]
        index = self._check_index(index)
        r = self.render(index)
        image = (r["rgb"].transpose(2, 0, 1) - self.mean) / self.std
        sample = {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "seg": torch.from_numpy(r["seg"]),
            "depth": torch.from_numpy(r["depth"].astype(np.float32)[None]),
            "normal": torch.from_numpy(np.ascontiguousarray(r["normal"].transpose(2, 0, 1),
                                                            dtype=np.float32)),
            "boxes": torch.from_numpy(r["boxes"]),
            "labels": torch.from_numpy(r["labels"]),
            "meta": {"index": index, "seed": self.seed, "size": self.size,
                     "source": f"synthetic:{self.seed}:{index}", **self.intrinsics},
        }
        if self.transform is not None:
            sample = self.transform(sample)
        return sample
