"""``Predictor``: a trained model (a checkpoint, or an exported ONNX file) run on your own images, with
every prediction given back at each image's own size.

``Predictor(config, checkpoint)(image)`` takes an RGB ``uint8 [H, W, 3]`` array (or an image file) of any
size and returns ``{task: prediction}`` at ``H x W``:

- ``seg``: class ids ``[H, W]`` (uint8 for up to 256 classes, else int32); ``seg_probs`` ``[C, H, W]``
  float32 (the softmax) when asked for;
- ``depth``: ``[H, W]`` float32 metres;
- ``normal``: ``[H, W, 3]`` float32 unit vectors, camera frame (x right, y down, z forward);
- ``det``: ``{"boxes" [K, 4] float32 xyxy in the image's pixels, "scores" [K], "labels" [K] int64}``.

The image goes through the run's evaluation transform (``build_transform(cfg.data, train=False)``:
resize to ``data.size``, with ``data.keep_ratio`` to fit inside it with the aspect ratio kept and padded
at the bottom and right). The dense maps are mapped back exactly: the part of the network's output that
shows the image (without the padding) is resized bilinearly to ``H x W`` (segmentation: the logits, then
the argmax, as the Cityscapes export does; normals: normalised, resized, normalised again), and boxes go
back through :func:`mtvision.data.transforms.boxes_to_original`, the mapping of ``tools/eval.py
--coco-export``.

With an ``.onnx`` file (``tools/export_onnx.py``) no PyTorch model is built: onnxruntime runs the file
and its metadata says how the images are normalised and what the outputs are. A file exported with
``--postprocess`` gives class ids, not logits: its ``seg`` is resized back by nearest neighbour, and it
has no ``seg_probs``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.io import read_image
from ..data.sample import to_tensor_sample
from ..data.transforms import MultiTaskTransform, boxes_to_original, build_transform
from .postprocess import output_names, task_kinds

__all__ = ["Predictor", "dataset_class_names"]

ImageLike = Union[np.ndarray, str, os.PathLike]

_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".onnx")


def dataset_class_names(data) -> Optional[tuple[str, ...]]:
    """The class names of the run's dataset (``cfg.data``) where they are known without reading the
    dataset itself: the built-in datasets' own lists, a custom folder's ``classes.txt``; else None."""
    from ..registry import DATASETS

    names = None
    try:
        if data.dataset == "cityscapes":
            from ..data.cityscapes import cityscapes_classes

            names = cityscapes_classes(int(data.num_classes))
        elif data.dataset == "custom" and data.root:
            from ..data.custom import read_class_names

            path = Path(data.root) / "classes.txt"
            names = read_class_names(path) if path.is_file() else None
        else:
            names = getattr(DATASETS.get(data.dataset), "classes", None)
    except Exception:  # noqa: BLE001 - names are a convenience: without them the ids are shown
        names = None
    if not isinstance(names, (tuple, list)) or len(names) != int(data.num_classes):
        return None
    return tuple(str(n) for n in names)


def _resize(x: Tensor, size: Sequence[int], mode: str = "bilinear") -> Tensor:
    """``[C, h, w]`` -> ``[C, H, W]`` (float32; bilinear without corner alignment, or nearest-exact)."""
    size = (int(size[0]), int(size[1]))
    x = x.float()
    if tuple(x.shape[-2:]) == size:
        return x
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(x[None], size=size, mode=mode, **kwargs)[0]


def shown_region(transform: Mapping) -> tuple[int, int]:
    """``(h, w)``: the top-left block of the network input that shows the image under the evaluation
    transform recorded in ``meta["transform"]`` (the rest is padding)."""
    if transform.get("hflip") or any(int(v) != 0 for v in transform["crop"][:2]):
        raise ValueError("Predictor: only the evaluation transform (no flip, no crop offset) can be undone")
    (hs, ws), (_, _, x1, y1) = transform["scaled_size"], transform["crop"]
    return min(int(hs), int(y1)), min(int(ws), int(x1))


class Predictor:
    """A trained model on your own images (see the module doc for what it returns).

    Args:
        config: the run's YAML config, a :class:`~mtvision.config.Config`, or None when the checkpoint
            stores its config (every checkpoint ``tools/train.py`` writes does); combined with the
            checkpoint as the tools do (:func:`mtvision.engine.cli.config_for_checkpoint`). For an ONNX
            file, optional: its data settings (``data.size``, ``keep_ratio``, class names) are used
            instead of the file's metadata.
        checkpoint: a ``.pth`` written by ``tools/train.py``, or an ``.onnx`` file written by
            ``tools/export_onnx.py``. ``Predictor("best.pth")`` also works.
        device: ``cpu``, ``cuda``, ``cuda:1``, ``auto`` (default: the config's ``train.device``; for an ONNX
            file, CUDA when onnxruntime has it).
        amp: ``none``, ``bf16`` or ``fp16`` autocast (default: the config's ``train.amp``; PyTorch only).
        overrides: ``key=value`` config overrides, as on the tools' command lines.
        batch_size: images per forward pass in :meth:`batch` (default: ``data.batch_size``).
        providers: onnxruntime execution providers (default from ``device``).

    ``predictor(image, seg_probs=False)`` predicts one image; ``predictor.batch(images)`` many, in
    batches. Attributes: ``tasks``, ``kinds`` (task -> seg / depth / normal / det / None), ``size`` (the
    network input), ``keep_ratio``, ``class_names`` (or None), ``backend`` (``torch`` or
    ``onnxruntime``).
    """

    def __init__(self, config: Any = None, checkpoint: Union[str, os.PathLike, None] = None, *,
                 device: Optional[str] = None, amp: Optional[str] = None, overrides: Sequence[str] = (),
                 batch_size: Optional[int] = None, providers: Optional[Sequence[str]] = None):
        if checkpoint is None and isinstance(config, (str, os.PathLike)) \
                and Path(config).suffix.lower() in _CHECKPOINT_SUFFIXES:
            config, checkpoint = None, config
        if checkpoint is None:
            raise ValueError("Predictor: give a checkpoint (.pth) or an exported file (.onnx)")
        self.checkpoint = Path(checkpoint)
        if not self.checkpoint.is_file():
            raise FileNotFoundError(f"checkpoint not found: {self.checkpoint}")
        self._rng = np.random.default_rng(0)  # the evaluation transform draws nothing that matters
        if self.checkpoint.suffix.lower() == ".onnx":
            self._init_onnx(config, list(overrides), device, providers)
        else:
            self._init_torch(config, list(overrides), device, amp)
        self.batch_size = int(batch_size or self.batch_size)

    # -- set-up ---------------------------------------------------------------------------------------

    def _init_torch(self, config, overrides: list[str], device, amp) -> None:
        from ..config import Config, apply_overrides
        from ..engine import autocast_context
        from ..engine.cli import config_for_checkpoint, load_trained_model

        if device is not None:
            overrides.append(f"train.device={device}")
        if amp is not None:
            overrides.append(f"train.amp={amp}")
        if isinstance(config, Config):
            cfg = apply_overrides(config, overrides) if overrides else config
        else:
            cfg, _ = config_for_checkpoint(self.checkpoint, config, overrides)
        self.cfg = cfg
        self.model, _, self.device = load_trained_model(cfg, str(self.checkpoint))
        self.backend = "torch"
        self._autocast = autocast_context(cfg.train.amp, self.device)
        self.tasks = list(self.model.tasks)
        self.kinds = task_kinds(self.tasks)
        self._use_data_config(cfg)
        self.postprocessed = False
        self.raw_input = False

    def _use_data_config(self, cfg) -> None:
        data = cfg.data
        self.size, self.keep_ratio = (int(data.size[0]), int(data.size[1])), bool(data.keep_ratio)
        self.mean, self.std = tuple(data.mean), tuple(data.std)
        self.transform = build_transform(data, train=False)
        self.class_names = dataset_class_names(data)
        self.num_classes = int(data.num_classes)
        self.batch_size = int(data.batch_size)

    def _init_onnx(self, config, overrides: list[str], device, providers) -> None:
        from ..config import Config, apply_overrides, load_config
        from ..export import onnx_session, read_onnx_metadata

        meta = read_onnx_metadata(self.checkpoint)
        if "tasks" not in meta:
            from ..engine.checkpoint import CheckpointError

            raise CheckpointError(f"{self.checkpoint}: no mtvision metadata (a file tools/export_onnx.py did "
                                  f"not write)")
        self.cfg = None
        self.backend = "onnxruntime"
        self.tasks = list(meta["tasks"])
        self.kinds = dict(meta.get("task_kinds") or task_kinds(self.tasks))
        self.postprocessed = bool(meta.get("postprocess", False))
        self.raw_input = bool(meta.get("raw_input", False))
        self._det_settings = dict(meta.get("detection") or {})
        if config is not None:
            self.cfg = (apply_overrides(config, overrides) if overrides else config) \
                if isinstance(config, Config) else load_config(config, overrides)
            self._use_data_config(self.cfg)
        else:
            size = meta.get("image_size")
            if size is None:
                raise ValueError(f"{self.checkpoint}: metadata mtvision.image_size missing")
            self.size, self.keep_ratio = (int(size[0]), int(size[1])), bool(meta.get("keep_ratio", False))
            self.mean, self.std = tuple(meta["mean"]), tuple(meta["std"])
            self.transform = MultiTaskTransform(self.size, keep_ratio=self.keep_ratio)
            names = meta.get("class_names")
            self.class_names = tuple(names) if names else None
            self.num_classes = int(meta.get("num_classes") or (len(names) if names else 2**31 - 1))
            self.batch_size = 8
        if not meta.get("dynamic_size", False) and list(self.size) != list(meta.get("image_size", self.size)):
            from ..config import ConfigError

            raise ConfigError(f"data.size: {self.checkpoint} takes {meta['image_size']} images, the config "
                              f"says {list(self.size)} (export with --dynamic-size)")
        import onnxruntime as ort

        if providers is None:
            use_cuda = device not in ("cpu",) and "CUDAExecutionProvider" in ort.get_available_providers()
            providers = ["CUDAExecutionProvider"] * use_cuda + ["CPUExecutionProvider"]
        self.device = torch.device("cpu")
        self._session = onnx_session(self.checkpoint, providers)
        self._output_names = [o.name for o in self._session.get_outputs()]
        batch_dim = self._session.get_inputs()[0].shape[0]
        self._static_batch = isinstance(batch_dim, int)

    # -- prediction -----------------------------------------------------------------------------------

    def __call__(self, image: ImageLike, seg_probs: bool = False) -> dict[str, Any]:
        """The predictions of one image (an RGB array ``[H, W, 3]`` or an image file) at its own size."""
        return self.batch([image], seg_probs=seg_probs)[0]

    def batch(self, images: Iterable[ImageLike], seg_probs: bool = False,
              batch_size: Optional[int] = None) -> list[dict[str, Any]]:
        """:meth:`__call__` of every image, ``batch_size`` (default ``self.batch_size``) per forward pass."""
        if seg_probs and self.postprocessed:
            raise ValueError(f"{self.checkpoint} was exported with --postprocess: it gives class ids, not "
                             f"probabilities (use the checkpoint or a file exported without --postprocess)")
        n = 1 if self.backend == "onnxruntime" and self._static_batch else int(batch_size or self.batch_size)
        images = list(images)
        results = []
        for start in range(0, len(images), n):
            results += self._predict([self.load(x) for x in images[start:start + n]], seg_probs)
        return results

    @staticmethod
    def load(image: ImageLike) -> np.ndarray:
        """An image file (read as RGB; :class:`~mtvision.data.DataError` naming it when it cannot be) or an
        array, checked: ``[H, W, 3]`` (a grey ``[H, W]`` one is repeated over the channels), uint8 or
        float in [0, 1]."""
        if isinstance(image, (str, os.PathLike)):
            return read_image(image)
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
            raise ValueError(f"Predictor: expected an RGB image [H, W, 3], got shape {arr.shape}")
        if arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"Predictor: expected a uint8 image (or float in [0, 1]), got {arr.dtype}")
        return arr

    def preprocess(self, image: np.ndarray) -> tuple[Tensor, dict]:
        """``(network input [3, h, w] float32, the applied transform's parameters)`` of one RGB image:
        the evaluation transform, then the normalisation (none for a raw-input ONNX file)."""
        raw = self.transform({"image": image}, self._rng)
        mean, std = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)) if self.raw_input else (self.mean, self.std)
        return to_tensor_sample(raw, mean, std)["image"], raw["meta"]["transform"]

    def forward(self, images: Tensor) -> dict[str, Any]:
        """The network on a batch of preprocessed images: ``{name: batched output}`` (PyTorch: the heads'
        outputs, with ``det`` decoded into a list of per-image dicts; ONNX: the file's outputs)."""
        if self.backend == "onnxruntime":
            from ..export import INPUT_NAME

            got = self._session.run(None, {INPUT_NAME: images.numpy()})
            return {n: torch.from_numpy(g) for n, g in zip(self._output_names, got)}
        with torch.no_grad(), self._autocast():
            out = self.model(images.to(self.device))
        for task, kind in self.kinds.items():
            if kind == "det":
                head = self.model.heads[task]
                if hasattr(head, "predict"):
                    out[task] = head.predict(out[task], images.shape[-2:])
                else:
                    from ..models.heads import decode_detections

                    out[task] = decode_detections(out[task], images.shape[-2:])
        return out

    def _predict(self, images: list[np.ndarray], seg_probs: bool) -> list[dict[str, Any]]:
        inputs, transforms = zip(*(self.preprocess(im) for im in images))
        out = self.forward(torch.stack(inputs))
        results = []
        for i, transform in enumerate(transforms):
            results.append({})
            with torch.no_grad():
                for task in self.tasks:
                    results[-1].update(self._to_original(task, out, i, transform, seg_probs))
        return results

    def _detections(self, task: str, out: Mapping[str, Any], i: int) -> dict[str, Tensor]:
        """Image ``i``'s decoded detections at the network input's size."""
        if self.backend == "torch":
            return out[task][i]
        if self.postprocessed:
            boxes, scores, labels, count = (out[n] for n in output_names(task, "det"))
            n = int(count[i])
            return {"boxes": boxes[i, :n], "scores": scores[i, :n], "labels": labels[i, :n]}
        from ..models.heads import decode_detections

        return decode_detections(out[task][i:i + 1], self.size, **self._det_settings.get(task, {}))[0]

    def _to_original(self, task: str, out: Mapping[str, Any], i: int, transform: Mapping,
                     seg_probs: bool) -> dict[str, Any]:
        """``{key: numpy}`` of ``task`` for image ``i``, mapped back to the image's own size."""
        kind = self.kinds.get(task)
        size = tuple(int(v) for v in transform["input_size"])
        if kind == "det":
            det = self._detections(task, out, i)
            return {task: {"boxes": boxes_to_original(det["boxes"], transform).astype(np.float32),
                           "scores": det["scores"].detach().float().cpu().numpy(),
                           "labels": det["labels"].detach().cpu().numpy().astype(np.int64)}}
        name = output_names(task, kind)[0] if self.postprocessed else task
        if kind is None:
            return {task: out[name][i].detach().float().cpu().numpy()}
        h, w = shown_region(transform)
        x = out[name][i]
        if kind == "seg" and self.postprocessed:  # class ids: nearest neighbour
            labels = _resize(x[None, :h, :w], size, mode="nearest-exact")[0]
            return {task: self._label_array(labels)}
        if kind == "seg":
            logits = _resize(x[:, :h, :w], size)
            result = {task: self._label_array(logits.argmax(0))}
            if seg_probs:
                result[f"{task}_probs"] = torch.softmax(logits, dim=0).cpu().numpy()
            return result
        if kind == "depth":
            x = x if x.dim() == 3 else x[None]
            return {task: _resize(x[:, :h, :w], size)[0].cpu().numpy()}
        normal = F.normalize(_resize(F.normalize(x.float(), dim=0)[:, :h, :w], size), dim=0)
        return {task: np.ascontiguousarray(normal.permute(1, 2, 0).cpu().numpy())}

    def _label_array(self, labels: Tensor) -> np.ndarray:
        return labels.cpu().numpy().astype(np.uint8 if self.num_classes <= 256 else np.int32)
