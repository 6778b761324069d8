"""Datasets yielding the sample dicts of DESIGN §3, and their collate function."""

from .collate import collate_samples
from .synthetic import SYNTHETIC_CLASSES, SyntheticScenes

__all__ = ["SYNTHETIC_CLASSES", "SyntheticScenes", "collate_samples"]
