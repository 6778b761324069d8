"""Running a trained model on your own images: :class:`Predictor` (also ``mtvision.Predictor``), the
post-processing an exported graph can compute (``mtvision.inference.postprocess``), and the files
``tools/predict.py --input`` writes (``mtvision.inference.writers``)."""

from .postprocess import decode_detections_fixed, postprocess_outputs, task_kinds
from .predictor import Predictor, dataset_class_names

__all__ = ["Predictor", "dataset_class_names", "decode_detections_fixed", "postprocess_outputs", "task_kinds"]
