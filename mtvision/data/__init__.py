"""Datasets yielding tensor sample dicts (``image`` float32 ``[3,H,W]``, ``seg``, ``depth``, ``normal``,
``boxes``/``labels``, ``meta``: see :func:`mtvision.data.sample.to_tensor_sample`), and their collate
function."""

from .builders import DATASETS, build_dataset
from .cityscapes import Cityscapes
from .coco import CocoDetection
from .collate import collate_samples
from .custom import FolderDataset
from .nyuv2 import NYUV2_CLASSES, NYUv2
from .synthetic import SYNTHETIC_CLASSES, SyntheticScenes

__all__ = ["DATASETS", "SYNTHETIC_CLASSES", "SyntheticScenes", "build_dataset", "collate_samples",
           "Cityscapes", "CocoDetection", "FolderDataset", "NYUV2_CLASSES", "NYUv2"]
