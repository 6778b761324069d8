"""Datasets yielding the sample dicts of DESIGN §3, and their collate function."""

from .builders import DATASETS, build_dataset
from .collate import collate_samples
from .synthetic import SYNTHETIC_CLASSES, SyntheticScenes

__all__ = ["DATASETS", "SYNTHETIC_CLASSES", "SyntheticScenes", "build_dataset", "collate_samples"]
