"""Task heads: each takes the neck levels and the image size. The dense ones return their map at input
resolution; the detection head (:class:`FCOSHead`, FCOS) its predictions at every point of its levels,
decoded into boxes by :func:`decode_detections`.

The dense heads come in two families with the same contract (``head(features, image_size) ->
[B, C, H, W]``, activation in ``activate``): the semantic-FPN heads (:class:`SegmentationHead`,
:class:`DepthHead`, :class:`NormalHead`) and the DeepLab heads (ASPP, optionally with the DeepLabV3+
decoder; :class:`DeepLabSegmentationHead`, :class:`DeepLabDepthHead`, :class:`DeepLabNormalHead`).
Every built-in head says what its output is in ``output_description`` (an exported model's metadata).
"""

from .common import ConvGNReLU, DenseHead, SemanticFPNDecoder
# the registration order is the order HEADS lists them in: the semantic-FPN heads first
from .segmentation import SegmentationHead  # isort: skip
from .depth import DepthHead  # isort: skip
from .normals import NormalHead  # isort: skip
from .deeplab import (
    ASPP,
    DeepLabDecoder,
    DeepLabDepthHead,
    DeepLabHead,
    DeepLabNormalHead,
    DeepLabSegmentationHead,
)
from .detection import FCOSHead, decode_detections, detection_scores_and_boxes, split_detection_output

__all__ = [
    "ASPP",
    "ConvGNReLU",
    "DeepLabDecoder",
    "DeepLabDepthHead",
    "DeepLabHead",
    "DeepLabNormalHead",
    "DeepLabSegmentationHead",
    "DenseHead",
    "FCOSHead",
    "decode_detections",
    "detection_scores_and_boxes",
    "split_detection_output",
    "DepthHead",
    "NormalHead",
    "SegmentationHead",
    "SemanticFPNDecoder",
]
