#!/usr/bin/env python
"""Export a trained checkpoint to ONNX and check it with onnxruntime:
``python tools/export_onnx.py [CONFIG] --checkpoint PATH --out model.onnx [--raw-input] [--dynamic-size]
[--static-batch] [--postprocess] [--fp16] [--opset N] [--no-check] [key=value ...]``

The file takes ``image`` ``[B, 3, H, W]`` float32 (normalised with the config's ``data.mean``/``data.std``;
``--raw-input``: RGB in [0, 1], normalised in the graph) and gives one output per task, named after it
(see ``mtvision.export.onnx``). The graph is traced at the run's ``data.size``; the batch is dynamic
unless ``--static-batch``, the height and width only with ``--dynamic-size``. The export runs on the CPU.

``--postprocess``: the graph also does the post-processing: outputs ``seg_labels`` (argmax), ``depth``,
``normal`` (unit length), and for detection ``det_boxes``, ``det_scores``, ``det_labels``, ``det_count``
(FCOS decoding with class-wise NMS, ONNX ``NonMaxSuppression``; the head's ``max_detections`` per image,
padded). ``--fp16``: float16 weights and arithmetic (input and outputs float32). The metadata also
records ``data.keep_ratio``, ``num_classes`` and the class names, so ``mtvision.Predictor`` and
``tools/predict.py --onnx`` need nothing else.

Unless ``--no-check``, the file is then run with onnxruntime on random images (batch 2, and at another
size when it is dynamic) and compared with the PyTorch model; the largest difference per output is
printed, and the tool exits with status 1 when an output differs by more than 1e-4 + 1e-3 * its range
(with ``--postprocess``: class ids agreeing on fewer than 99.9 % of the pixels, or other boxes after NMS;
``--fp16``: 1e-2 + 3e-2 * the range, 99 % of the pixels, boxes not compared).
"""

from __future__ import annotations

import sys

import torch

from mtvision.engine.cli import (checkpoint_tool_parser, config_from_args, exit_on_user_error,
                                 load_trained_model)
from mtvision.export import ExportError, check_onnx, export_onnx, read_onnx_metadata, size_multiple
from mtvision.inference import dataset_class_names


def check_images(size, multiple: int, dynamic_size: bool, raw_input: bool, mean, std) -> list[torch.Tensor]:
    """Random inputs the check runs on, in the file's input convention: batch 2 at the traced size
    ``(H, W)``, and with a dynamic size batch 1 at another size (larger by a multiple of ``multiple``,
    the width by one multiple: an odd width for a CNN)."""
    g = torch.Generator().manual_seed(0)
    H, W = size
    sizes = [(2, H, W)]
    if dynamic_size:
        sizes.append((1, H + multiple * max(1, 16 // multiple), W + multiple))
    out = []
    for b, h, w in sizes:
        rgb = torch.rand(b, 3, h, w, generator=g)
        if not raw_input:
            rgb = (rgb - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        out.append(rgb)
    return out


@exit_on_user_error
def main(argv=None) -> int:
    parser = checkpoint_tool_parser(__doc__, out_help="the .onnx file to write")
    parser.add_argument("--raw-input", action="store_true",
                        help="the graph takes RGB in [0, 1] and normalises it with data.mean/std")
    parser.add_argument("--dynamic-size", action="store_true", help="symbolic image height and width")
    parser.add_argument("--static-batch", action="store_true", help="batch fixed at 1")
    parser.add_argument("--postprocess", action="store_true",
                        help="argmax, unit normals and the detection decoding with NMS in the graph")
    parser.add_argument("--fp16", action="store_true", help="float16 weights and arithmetic")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch's)")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    args = parser.parse_intermixed_args(argv)
    args.overrides = [*args.overrides, "train.device=cpu", "train.amp=none"]  # exported on the CPU, in fp32
    cfg = config_from_args(args)
    model, _, _ = load_trained_model(cfg, args.checkpoint)
    mean, std = tuple(cfg.data.mean), tuple(cfg.data.std)
    run = {"keep_ratio": bool(cfg.data.keep_ratio), "num_classes": int(cfg.data.num_classes),
           "class_names": dataset_class_names(cfg.data)}
    try:
        path = export_onnx(model, args.out, cfg.data.size, mean=mean, std=std, raw_input=args.raw_input,
                           dynamic_batch=not args.static_batch, dynamic_size=args.dynamic_size,
                           opset=args.opset, postprocess=args.postprocess, fp16=args.fp16, extra_metadata=run)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size_mb = path.stat().st_size / 2**20
    batch = "1" if args.static_batch else "B"
    hw = "H, W" if args.dynamic_size else f"{cfg.data.size[0]}, {cfg.data.size[1]}"
    outputs = list(read_onnx_metadata(path).get("outputs", model.tasks))
    print(f"wrote {path} ({size_mb:.1f} MB{', float16' * args.fp16}): input image [{batch}, 3, {hw}], "
          f"outputs {', '.join(outputs)}")
    if args.no_check:
        return 0
    images = check_images(cfg.data.size, size_multiple(model), args.dynamic_size, args.raw_input, mean, std)
    if args.static_batch:
        images = [x[:1] for x in images]
    for x in images:
        try:
            diffs = check_onnx(path, model, x, raw_input=args.raw_input)
        except ExportError as e:
            print(f"error: onnxruntime check at {tuple(x.shape)}: {e}", file=sys.stderr)
            return 1
        shown = ", ".join(f"{t} {d:.2e}" for t, d in diffs.items())
        print(f"onnxruntime matches PyTorch at input {tuple(x.shape)}: max |difference| {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
