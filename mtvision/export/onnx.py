"""ONNX export of a trained :class:`~mtvision.models.MultiTaskModel`, checked with onnxruntime.

The exported graph is the model's inference forward: one input ``image`` ``[B, 3, H, W]`` float32 and one
output per task, named after the task, in the model's task order (with the built-in heads: ``seg``
logits ``[B, C, H, W]``, ``depth`` ``[B, 1, H, W]`` in metres, ``normal`` ``[B, 3, H, W]`` raw vectors, to
be normalised to unit length, ``det`` FCOS's per-point predictions ``[B, A, C + 8]``, decoded and
NMS'ed outside the graph by :func:`mtvision.models.heads.decode_detections`). The batch size is
dynamic; the image size is too when asked (``dynamic_size``), within what the backbone accepts (a
ViT: multiples of its patch size).

By default the input is normalised as in training (``(rgb - mean) / std``, ``rgb`` in [0, 1]);
``raw_input=True`` puts that normalisation into the graph, so the input is RGB in [0, 1]. The file's
metadata (``metadata_props``) records the tasks, what each output is, the input convention, mean/std
and the size multiple, so a deployment needs nothing else from the config.

Export goes through ``torch.onnx.export(..., dynamo=True)`` (torch.export, then onnxscript); it needs the
``export`` extra: ``pip install 'mtvision[export]'`` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["ExportError", "InferenceGraph", "export_onnx", "check_onnx", "read_onnx_metadata", "onnx_outputs",
           "size_multiple", "INPUT_NAME"]

INPUT_NAME = "image"


class ExportError(RuntimeError):
    """The model cannot be exported or the exported file does not match it; the message says which and why."""


def _require_onnx_packages() -> None:
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)}: pip install 'mtvision[export]'")


class InferenceGraph(nn.Module):
    """What the ONNX file computes: ``images [B, 3, H, W]`` -> a tuple with one map per task, in
    ``model.tasks`` order. ``mean``/``std`` (per RGB channel, for images in [0, 1]) given: the images are
    raw RGB in [0, 1] and are normalised here first."""

    def __init__(self, model: nn.Module, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None):
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("InferenceGraph: give both mean and std, or neither")
        self.model = model
        self.tasks = list(model.tasks)
        self.normalise = mean is not None
        if self.normalise:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        if self.normalise:
            images = ((images - self.mean) * self.inv_std).to(images.dtype)
        outputs = self.model(images)
        return tuple(outputs[t] for t in self.tasks)


def _output_meaning(head: nn.Module) -> str:
    """The head's own ``output_description`` (the built-in heads have one), else its class name."""
    return getattr(head, "output_description", f"output of {type(head).__name__}")


def size_multiple(model: nn.Module) -> int:
    """The input's height and width must be multiples of this (a ViT backbone's patch size; 1 for a CNN)."""
    return int(getattr(model.backbone, "patch_size", 1))


def export_onnx(model: nn.Module, path: Union[str, Path], image_size: Sequence[int], *,
                mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                raw_input: bool = False, dynamic_batch: bool = True, dynamic_size: bool = False,
                opset: Optional[int] = None) -> Path:
    """Write ``model`` (a :class:`MultiTaskModel`) as an ONNX file at ``path``; returns the path.

    Args:
        image_size: ``(H, W)`` of the example input the graph is traced at (the fixed size unless
            ``dynamic_size``).
        mean, std: the training normalisation (config ``data.mean``/``data.std``); recorded in the
            metadata, and applied in the graph when ``raw_input``.
        raw_input: the graph takes RGB in [0, 1] and normalises it itself.
        dynamic_batch: the batch dimension is symbolic (else fixed at 1).
        dynamic_size: height and width are symbolic too (multiples of :func:`size_multiple`).
        opset: ONNX opset (default: torch's).

    The model is exported on the CPU in float32, in eval mode; its own device, dtype and mode are left
    as they were.
    """
    _require_onnx_packages()
    import onnx

    H, W = (int(s) for s in image_size)
    multiple = size_multiple(model)
    if H < 1 or W < 1 or H % multiple or W % multiple:
        raise ExportError(f"image size {H}x{W}: height and width must be positive multiples of {multiple} "
                          f"(the backbone's patch size)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A copy: export needs the CPU and float32, and must leave the caller's model as it is.
    cpu_model = copy.deepcopy(model).to("cpu", torch.float32)
    graph = (InferenceGraph(cpu_model, mean, std) if raw_input else InferenceGraph(cpu_model)).eval()
    example = torch.rand(1 if not dynamic_batch else 2, 3, H, W)
    dims: dict[int, object] = {}
    if dynamic_batch:
        dims[0] = torch.export.Dim("batch", min=1, max=4096)
    if dynamic_size:
        for axis, name in ((2, "height"), (3, "width")):
            if multiple > 1:
                dims[axis] = multiple * torch.export.Dim(f"{name}_in_patches", min=1, max=16384 // multiple)
            else:
                dims[axis] = torch.export.Dim(name, min=16, max=16384)
    try:
        program = torch.onnx.export(graph, (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=graph.tasks, dynamic_shapes=({**dims},) if dims else None,
                                    opset_version=opset, verbose=False)
    except Exception as e:  # the exporter's message is mostly advice: report the error that caused it
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        detail = " ".join(str(root).strip().splitlines()[:3])
        hint = " (try without dynamic_size / --dynamic-size)" if dynamic_size else ""
        raise ExportError(f"exporting to {path} failed{hint}: {type(root).__name__}: {detail}") from e
    program.save(str(path))

    proto = onnx.load(str(path), load_external_data=False)
    heads = model.heads
    meta = {
        "mtvision.tasks": json.dumps(graph.tasks),
        "mtvision.outputs": json.dumps({t: _output_meaning(heads[t]) for t in graph.tasks}),
        "mtvision.input": ("RGB in [0, 1], [B, 3, H, W] float32 (normalised in the graph)" if raw_input else
                           "(RGB in [0, 1] - mean) / std, [B, 3, H, W] float32"),
        "mtvision.raw_input": json.dumps(bool(raw_input)),
        "mtvision.mean": json.dumps([float(m) for m in mean]),
        "mtvision.std": json.dumps([float(s) for s in std]),
        "mtvision.image_size": json.dumps([H, W]),
        "mtvision.dynamic_size": json.dumps(bool(dynamic_size)),
        "mtvision.size_multiple": json.dumps(multiple),
    }
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path


def read_onnx_metadata(path: Union[str, Path]) -> dict[str, object]:
    """The ``mtvision.*`` metadata of an exported file, values decoded
    (``{"tasks": [...], "mean": [...], ...}``)."""
    _require_onnx_packages()
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    out: dict[str, object] = {}
    for entry in proto.metadata_props:
        if entry.key.startswith("mtvision."):
            key = entry.key[len("mtvision."):]
            try:
                out[key] = json.loads(entry.value)
            except json.JSONDecodeError:
                out[key] = entry.value
    return out


def check_onnx(path: Union[str, Path], model: nn.Module, images: Tensor, *, raw_input: Optional[bool] = None,
               rtol: float = 1e-3, atol: float = 1e-4) -> dict[str, float]:
    """Run the file with onnxruntime (CPU) and ``model`` in PyTorch on ``images`` (``[B, 3, H, W]``, as
    the file takes them); returns ``{task: max |onnx - torch|}``. Raises :class:`ExportError` naming the
    task when an output differs by more than ``atol + rtol * max |torch|`` or has another shape.
    ``raw_input``: whether the file normalises itself (default: read from its metadata)."""
    meta = read_onnx_metadata(path)
    if raw_input is None:
        raw_input = bool(meta.get("raw_input", False))
    mean, std = meta.get("mean"), meta.get("std")
    if raw_input and (mean is None or std is None):
        raise ExportError(f"{path}: metadata mtvision.mean/std missing, needed for a raw-input file")
    got = onnx_outputs(path, images)
    names = list(got)
    params = next(model.parameters())
    was_training = model.training
    graph = InferenceGraph(model, mean, std) if raw_input else InferenceGraph(model)
    graph = graph.to(params.device).eval()
    try:
        with torch.no_grad():
            expected = graph(images.detach().to(params.device, params.dtype))
    finally:
        model.train(was_training)
    if names != graph.tasks:
        raise ExportError(f"{path}: outputs {names} are not the model's tasks {graph.tasks}")
    diffs: dict[str, float] = {}
    for task, out, ref in zip(names, got.values(), expected):
        ref = ref.float().cpu()
        if tuple(out.shape) != tuple(ref.shape):
            raise ExportError(f"{path}: output {task!r} has shape {tuple(out.shape)}, "
                              f"PyTorch gives {tuple(ref.shape)}")
        diff = float((out - ref).abs().max()) if ref.numel() else 0.0
        bound = atol + rtol * float(ref.abs().max()) if ref.numel() else atol
        if not diff <= bound:  # also catches NaN
            raise ExportError(f"{path}: output {task!r} differs from PyTorch by up to {diff:.3g} "
                              f"(allowed {bound:.3g})")
        diffs[task] = diff
    return diffs


def onnx_outputs(path: Union[str, Path], images: Tensor) -> dict[str, Tensor]:
    """``{task: map}``, in the file's output order: the file run with onnxruntime (CPU) on ``images``
    ``[B, 3, H, W]``."""
    _require_onnx_packages()
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = session.run(None, {INPUT_NAME: images.detach().to("cpu", torch.float32).numpy()})
    return {n: torch.from_numpy(g) for n, g in zip(names, got)}
