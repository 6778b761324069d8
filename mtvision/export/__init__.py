"""Export of trained models: ONNX (``mtvision.export.onnx``; needs ``pip install 'mtvision[export]'``)."""

from .onnx import (
    INPUT_NAME,
    ExportError,
    InferenceGraph,
    check_onnx,
    export_onnx,
    onnx_outputs,
    onnx_session,
    read_onnx_metadata,
    size_multiple,
)

__all__ = ["INPUT_NAME", "ExportError", "InferenceGraph", "check_onnx", "export_onnx", "onnx_outputs",
           "onnx_session", "read_onnx_metadata", "size_multiple"]
