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

``postprocess=True`` puts the post-processing into the graph too
(:func:`mtvision.inference.postprocess_outputs`): the outputs are ``seg_labels`` (int64 ``[B, H, W]``,
the argmax), ``depth`` (``[B, H, W]`` metres), ``normal`` (``[B, 3, H, W]`` unit vectors) and, for
detection, ``det_boxes`` ``[B, M, 4]`` (xyxy, input pixels), ``det_scores`` ``[B, M]``, ``det_labels``
``[B, M]`` (int64, -1 = padding) and ``det_count`` ``[B]``: the FCOS decoding with class-wise NMS (ONNX
``NonMaxSuppression``), the ``M = max_detections`` best per image, padded. ``fp16=True`` writes the
network's weights and arithmetic in float16 (input and outputs stay float32).

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
           "onnx_session", "size_multiple", "INPUT_NAME"]

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
    """What the ONNX file computes: ``images [B, 3, H, W]`` -> a tuple of maps, named ``output_names``: one
    per task, in ``model.tasks`` order, or with ``postprocess`` the post-processed outputs
    (:func:`mtvision.inference.postprocess_outputs`). ``mean``/``std`` (per RGB channel, for images in
    [0, 1]) given: the images are raw RGB in [0, 1] and are normalised here first. ``half``: the model runs
    in float16 (it must already be a float16 model); the images come in and the outputs go out in float32."""

    def __init__(self, model: nn.Module, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, postprocess: bool = False, half: bool = False):
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("InferenceGraph: give both mean and std, or neither")
        from ..inference.postprocess import detection_settings, output_names, task_kinds

        self.model = model
        self.tasks = list(model.tasks)
        self.normalise = mean is not None
        self.postprocess, self.half = bool(postprocess), bool(half)
        self.kinds = task_kinds(self.tasks)
        self.det_settings = {t: detection_settings(model.heads[t])
                             for t, k in self.kinds.items() if k == "det"}
        self.output_names = ([n for t in self.tasks for n in output_names(t, self.kinds[t])]
                             if self.postprocess else list(self.tasks))
        if self.normalise:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        if self.normalise:
            images = ((images - self.mean) * self.inv_std).to(images.dtype)
        outputs = self.model(images.half() if self.half else images)
        if self.half:
            outputs = {t: v.float() for t, v in outputs.items()}
        if not self.postprocess:
            return tuple(outputs[t] for t in self.tasks)
        from ..inference.postprocess import postprocess_outputs

        out = postprocess_outputs({t: outputs[t] for t in self.tasks}, images.shape[-2:], self.kinds,
                                  self.det_settings)
        return tuple(out[n] for n in self.output_names)


def _nms_keep_onnx(boxes, scores, iou_threshold: float, score_threshold: float):
    """ONNX translation of ``mtvision_inference::nms_keep``: ``NonMaxSuppression`` per image on one
    "class" (the boxes are already moved apart per class), its selected indices scattered into a
    ``[B, K]`` bool mask."""
    import numpy as np
    import onnxscript
    from onnxscript import opset18 as op

    # torchvision suppresses where the float32 IoU > the threshold as a double, onnxruntime where it is >
    # the threshold as a float32: the largest float32 not above the double makes the two agree, also for
    # an IoU exactly at the threshold (common: boxes clipped to the image edges, on a grid of strides).
    iou = np.float32(iou_threshold)
    if float(iou) > iou_threshold:
        iou = np.nextafter(iou, np.float32(-np.inf))
    k = op.Shape(scores, start=1, end=2)
    selected = op.NonMaxSuppression(boxes, op.Unsqueeze(scores, op.Constant(value_ints=[1])), k,
                                    op.Constant(value_floats=[float(iou)]),
                                    op.Constant(value_floats=[score_threshold]))
    batch_and_box = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)
    ones = op.Expand(op.Constant(value=onnxscript.ir.tensor(np.array([True]))),
                     op.Shape(selected, start=0, end=1))
    zeros = op.Expand(op.Constant(value=onnxscript.ir.tensor(np.array([False]))), op.Shape(scores))
    return op.ScatterND(zeros, batch_and_box, ones)


def _translations() -> dict:
    """The exporter's translations of mtvision's own operators."""
    from ..inference import postprocess  # noqa: F401 - registers the operator

    return {torch.ops.mtvision_inference.nms_keep.default: _nms_keep_onnx}


def _output_meaning(head: nn.Module) -> str:
    """The head's own ``output_description`` (the built-in heads have one), else its class name."""
    return getattr(head, "output_description", f"output of {type(head).__name__}")


#: What each post-processed output is, by task kind and output suffix.
_POSTPROCESSED_MEANING = {
    ("seg", "labels"): "class ids [B, H, W] int64 (argmax of the segmentation logits)",
    ("depth", ""): "depth [B, H, W] in metres",
    ("normal", ""): "unit surface normals [B, 3, H, W], camera frame (x right, y down, z forward)",
    ("det", "boxes"): "boxes [B, M, 4] xyxy in input pixels, by decreasing score; padding 0",
    ("det", "scores"): "scores [B, M] (sqrt(class * centerness)); padding 0",
    ("det", "labels"): "class ids [B, M] int64; padding -1",
    ("det", "count"): "number of detections [B] int64: the first count entries of boxes/scores/labels",
}


def _output_meanings(graph: InferenceGraph) -> dict[str, str]:
    heads = graph.model.heads
    if not graph.postprocess:
        return {t: _output_meaning(heads[t]) for t in graph.tasks}
    out = {}
    for task in graph.tasks:
        kind = graph.kinds[task]
        from ..inference.postprocess import output_names

        for name in output_names(task, kind):
            suffix = name[len(task) + 1:]
            out[name] = _POSTPROCESSED_MEANING.get((kind, suffix), _output_meaning(heads[task]))
    return out


def size_multiple(model: nn.Module) -> int:
    """The input's height and width must be multiples of this (a ViT backbone's patch size; 1 for a CNN)."""
    return int(getattr(model, "patch_size", 1) or 1)


def _exporter_friendly_attention(model: nn.Module) -> None:
    """Hiera's mask-unit attention calls ``scaled_dot_product_attention`` on 5-D tensors (batch, heads,
    windows, tokens, dims), which the ONNX exporter refuses ("only 4D query, key, and value are
    supported"); its other path (timm's ``fused_attn = False``: matmul, softmax, matmul) computes the same
    attention and exports. Switched on the export's copy of the model only."""
    for module in model.modules():
        if type(module).__module__ == "timm.models.hiera" and getattr(module, "fused_attn", False):
            module.fused_attn = False


def export_onnx(model: nn.Module, path: Union[str, Path], image_size: Sequence[int], *,
                mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                raw_input: bool = False, dynamic_batch: bool = True, dynamic_size: bool = False,
                opset: Optional[int] = None, postprocess: bool = False, fp16: bool = False,
                extra_metadata: Optional[dict[str, object]] = None) -> Path:
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
        postprocess: the post-processing in the graph too (module doc): class ids, unit normals, boxes
            after NMS.
        fp16: the network in float16 (input and outputs float32).
        extra_metadata: more ``mtvision.<key>`` metadata entries (JSON-encoded), e.g. ``keep_ratio`` and
            ``class_names``, which :class:`mtvision.Predictor` reads.

    The model is exported on the CPU in float32 (float16 with ``fp16``), in eval mode; its own device,
    dtype and mode are left as they were.
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
    cpu_model = copy.deepcopy(model).to("cpu", torch.float16 if fp16 else torch.float32)
    _exporter_friendly_attention(cpu_model)
    norm = (mean, std) if raw_input else (None, None)
    graph = InferenceGraph(cpu_model, *norm, postprocess=postprocess, half=fp16).eval()
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
                                    output_names=graph.output_names,
                                    dynamic_shapes=({**dims},) if dims else None, opset_version=opset,
                                    custom_translation_table=_translations(), verbose=False)
    except Exception as e:  # the exporter's message is mostly advice: report the error that caused it
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        detail = " ".join(str(root).strip().splitlines()[:3])
        hint = " (try without dynamic_size / --dynamic-size)" if dynamic_size else ""
        raise ExportError(f"exporting to {path} failed{hint}: {type(root).__name__}: {detail}") from e
    program.save(str(path))

    proto = onnx.load(str(path), load_external_data=False)
    meta = {
        "mtvision.tasks": json.dumps(graph.tasks),
        "mtvision.outputs": json.dumps(_output_meanings(graph)),
        "mtvision.input": ("RGB in [0, 1], [B, 3, H, W] float32 (normalised in the graph)" if raw_input else
                           "(RGB in [0, 1] - mean) / std, [B, 3, H, W] float32"),
        "mtvision.raw_input": json.dumps(bool(raw_input)),
        "mtvision.mean": json.dumps([float(m) for m in mean]),
        "mtvision.std": json.dumps([float(s) for s in std]),
        "mtvision.image_size": json.dumps([H, W]),
        "mtvision.dynamic_size": json.dumps(bool(dynamic_size)),
        "mtvision.size_multiple": json.dumps(multiple),
        "mtvision.postprocess": json.dumps(bool(postprocess)),
        "mtvision.fp16": json.dumps(bool(fp16)),
        "mtvision.task_kinds": json.dumps(graph.kinds),
        "mtvision.detection": json.dumps(graph.det_settings),
        **{f"mtvision.{k}": json.dumps(v) for k, v in (extra_metadata or {}).items()},
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
               rtol: Optional[float] = None, atol: Optional[float] = None,
               label_agreement: Optional[float] = None) -> dict[str, float]:
    """Run the file with onnxruntime (CPU) and ``model`` in PyTorch on ``images`` (``[B, 3, H, W]``, as
    the file takes them); returns ``{output: max |onnx - torch|}``. Raises :class:`ExportError` naming the
    output when it differs by more than ``atol + rtol * max |torch|`` or has another shape.
    ``raw_input``: whether the file normalises itself (default: read from its metadata).

    A post-processed file (metadata ``postprocess``) is compared with the same post-processing run in
    PyTorch: class ids must agree on at least ``label_agreement`` of the pixels (the value returned is the
    fraction that differs); the detections must be the same boxes (the same count and labels per image,
    boxes and scores within the tolerance). A float16 file (``fp16``) is compared with the float32 model
    with wider defaults (``rtol`` 3e-2, ``atol`` 1e-2, ``label_agreement`` 0.99; its detections after NMS
    are not compared, float16 scores reorder near-equal boxes); a float32 one with ``rtol`` 1e-3, ``atol``
    1e-4, ``label_agreement`` 0.999."""
    meta = read_onnx_metadata(path)
    if raw_input is None:
        raw_input = bool(meta.get("raw_input", False))
    fp16, postprocess = bool(meta.get("fp16", False)), bool(meta.get("postprocess", False))
    rtol = (3e-2 if fp16 else 1e-3) if rtol is None else rtol
    atol = (1e-2 if fp16 else 1e-4) if atol is None else atol
    label_agreement = (0.99 if fp16 else 0.999) if label_agreement is None else label_agreement
    mean, std = meta.get("mean"), meta.get("std")
    if raw_input and (mean is None or std is None):
        raise ExportError(f"{path}: metadata mtvision.mean/std missing, needed for a raw-input file")
    got = onnx_outputs(path, images)
    names = list(got)
    params = next(model.parameters())
    was_training = model.training
    norm = (mean, std) if raw_input else (None, None)
    graph = InferenceGraph(model, *norm, postprocess=postprocess).to(params.device).eval()
    try:
        with torch.no_grad():
            expected = dict(zip(graph.output_names, graph(images.detach().to(params.device, params.dtype))))
    finally:
        model.train(was_training)
    if names != graph.output_names:
        raise ExportError(f"{path}: outputs {names} are not the model's {graph.output_names}")

    def bound(ref: Tensor) -> float:
        return atol + rtol * float(ref.abs().max()) if ref.numel() else atol

    det_outputs = {}
    if postprocess:
        from ..inference.postprocess import output_names

        det_outputs = {t: output_names(t, "det") for t, k in graph.kinds.items() if k == "det"}
    in_det = {n for group in det_outputs.values() for n in group}
    labels = {f"{t}_labels" for t, k in graph.kinds.items() if k == "seg"} if postprocess else set()
    diffs: dict[str, float] = {}
    for name in names:
        out, ref = got[name], expected[name].cpu()
        if tuple(out.shape) != tuple(ref.shape):
            raise ExportError(f"{path}: output {name!r} has shape {tuple(out.shape)}, "
                              f"PyTorch gives {tuple(ref.shape)}")
        if name in in_det:
            continue
        if name in labels:
            same = float((out == ref).float().mean()) if ref.numel() else 1.0
            if not same >= label_agreement:
                raise ExportError(f"{path}: output {name!r} agrees with PyTorch on {100 * same:.3f} % of the "
                                  f"pixels (needed {100 * label_agreement:g} %)")
            diffs[name] = 1.0 - same
            continue
        ref = ref.float()
        diff = float((out.float() - ref).abs().max()) if ref.numel() else 0.0
        if not diff <= bound(ref):  # also catches NaN
            raise ExportError(f"{path}: output {name!r} differs from PyTorch by up to {diff:.3g} "
                              f"(allowed {bound(ref):.3g})")
        diffs[name] = diff
    if fp16:
        return diffs
    for n_boxes, n_scores, n_labels, n_count in det_outputs.values():
        count, ref_count = got[n_count], expected[n_count].cpu()
        if not torch.equal(count, ref_count):
            raise ExportError(f"{path}: output {n_count!r} is {count.tolist()}, "
                              f"PyTorch gives {ref_count.tolist()}")
        box_diff = score_diff = 0.0
        for b, n in enumerate(count.tolist()):
            # the same detections, in any order (boxes of near-equal scores may come in another order)
            boxes, ref_boxes = got[n_boxes][b, :n], expected[n_boxes][b, :n].cpu().float()
            scores, ref_scores = got[n_scores][b, :n], expected[n_scores][b, :n].cpu().float()
            dist = (boxes[:, None] - ref_boxes[None]).abs().amax(-1)
            dist[got[n_labels][b, :n, None] != expected[n_labels][b, :n].cpu()[None]] = float("inf")
            nearest = dist.min(dim=1) if n else None
            worst = max(float(nearest.values.max()), float(dist.min(dim=0).values.max())) if n else 0.0
            if not worst <= bound(ref_boxes):
                raise ExportError(f"{path}: outputs {n_boxes!r}/{n_labels!r} of image {b}: not the boxes "
                                  f"PyTorch gives (a box off by {worst:.3g} pixels or of another class)")
            box_diff = max(box_diff, worst)
            if n:
                score_diff = max(score_diff, float((scores - ref_scores[nearest.indices]).abs().max()))
        if not score_diff <= bound(expected[n_scores]):
            raise ExportError(f"{path}: output {n_scores!r} differs from PyTorch by up to {score_diff:.3g}")
        diffs.update({n_boxes: box_diff, n_scores: score_diff, n_labels: 0.0, n_count: 0.0})
    return diffs


def onnx_session(path: Union[str, Path], providers: Optional[Sequence[str]] = None,
                 threads: Optional[int] = None):
    """An onnxruntime ``InferenceSession`` of the file: on ``providers`` (default: the CPU), with
    ``threads`` intra-op threads when given."""
    _require_onnx_packages()
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), sess_options=options,
                                providers=list(providers or ["CPUExecutionProvider"]))


def onnx_outputs(path: Union[str, Path], images: Tensor) -> dict[str, Tensor]:
    """``{name: output}``, in the file's output order: the file run with onnxruntime (CPU) on ``images``
    ``[B, 3, H, W]``."""
    session = onnx_session(path)
    names = [o.name for o in session.get_outputs()]
    got = session.run(None, {INPUT_NAME: images.detach().to("cpu", torch.float32).numpy()})
    return {n: torch.from_numpy(g) for n, g in zip(names, got)}
