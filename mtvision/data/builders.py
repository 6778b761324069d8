"""``build_dataset``: the config's ``data`` section -> a Dataset, found by ``data.dataset`` in
``mtvision.registry.DATASETS`` (the built-ins register themselves in their modules, imported here)."""

from __future__ import annotations

from torch.utils.data import Dataset

from ..config import ConfigError, DataConfig
from ..registry import DATASETS
from . import cityscapes, coco, custom, nyuv2  # noqa: F401 -- each registers its dataset
from .synthetic import SyntheticScenes

__all__ = ["DATASETS", "VAL_SEED_OFFSET", "build_dataset"]

#: The synthetic validation set is drawn with ``seed + VAL_SEED_OFFSET``, the training set with ``seed``,
#: so the two never share a scene (scene ``i`` depends only on ``(seed, i)``).
VAL_SEED_OFFSET = 1_000_003

_SPLITS = ("train", "val")


def build_dataset(data: DataConfig, split: str, seed: int = 0) -> Dataset:
    """The training (``split="train"``) or validation (``split="val"``) set described by ``data``.

    ``seed`` is the experiment seed (``cfg.seed``); it only matters for generated datasets. For
    ``synthetic``: ``num_train`` / ``num_val`` scenes of ``data.size`` normalised with ``data.mean`` /
    ``data.std``, seed ``seed`` for train and ``seed + VAL_SEED_OFFSET`` for val (no augmentation: every
    scene is new). Datasets read from disk (``RawDataset`` subclasses) are built by their
    ``from_config(data, split_name, transform=..., seed=...)`` from ``data.root``, ``data.train_split`` /
    ``data.val_split`` and ``data.kwargs``, with ``mtvision.data.transforms.build_transform``
    (``data.augment`` for training, a plain resize to ``data.size`` for validation).
    Raises ConfigError naming ``data.dataset`` / ``data.root`` / ``data.num_classes`` on a bad value.
    """
    if split not in _SPLITS:
        raise ValueError(f"build_dataset: split must be one of {_SPLITS}, got {split!r}")
    cls = DATASETS.lookup(data.dataset, "data.dataset")
    if cls is SyntheticScenes:
        if data.root is not None:
            raise ConfigError(f"data.root: the synthetic dataset is generated and reads no files; "
                              f"set it to null (got {data.root!r})")
        if data.keep_ratio:
            raise ConfigError("data.keep_ratio: the synthetic scenes are rendered at data.size and never "
                              "resized; set it to false")
        n = len(SyntheticScenes.classes)
        if data.num_classes != n:
            raise ConfigError(f"data.num_classes: the synthetic scenes have {n} classes, "
                              f"got {data.num_classes}")
        train = split == "train"
        return SyntheticScenes(
            data.num_train if train else data.num_val,
            size=tuple(data.size),
            seed=seed if train else seed + VAL_SEED_OFFSET,
            mean=tuple(data.mean),
            std=tuple(data.std),
        )
    if data.root is None:
        raise ConfigError(f"data.root: the {data.dataset!r} dataset reads files; set data.root to its folder")
    from .transforms import build_transform

    train = split == "train"
    return cls.from_config(data, data.train_split if train else data.val_split,
                           transform=build_transform(data, train=train), seed=seed)
