#!/usr/bin/env python
"""Predict your own images, or write prediction pictures of validation images.

``python tools/predict.py [CONFIG] --checkpoint PATH --input PATH... --out DIR [--depth-npy] [key=value ...]``
``python tools/predict.py [CONFIG] --onnx model.onnx --input PATH... --out DIR``

Your images (``--input``: files, folders (their .png/.jpg/.jpeg/.bmp/.tif/.tiff/.webp files) and glob
patterns, e.g. ``'photos/**/*.jpg'``), each predicted at its own size (``mtvision.Predictor``: the run's
evaluation transform, undone exactly). Per image ``DIR/<stem>_seg.png`` (class ids, 8-bit, 16-bit beyond
256 classes), ``<stem>_depth.png`` (16-bit millimetres, 0 = invalid: the custom-dataset convention;
``--depth-npy``: also ``<stem>_depth.npy`` float metres), ``<stem>_normal.png`` (``(n + 1) / 2 * 255``
RGB), ``<stem>_det.json`` (boxes xyxy in the image's pixels, scores, labels, class names) and
``<stem>_vis.png`` (the input with its boxes and the colour-coded maps). An image that cannot be read
is reported by name and skipped; the others are still predicted, and the tool then exits with status 1.
``--onnx``: the exported file run with onnxruntime instead of the checkpoint (no PyTorch model; CONFIG
optional, the file's metadata says the rest).

``python tools/predict.py [CONFIG] --checkpoint PATH --out DIR [--num N] [key=value ...]``

Without ``--input``: one PNG per validation image (``DIR/0000.png`` ...): a row of the input, predicted
and true segmentation (fixed palette), predicted and true depth (colour map, common range), predicted and
true normals (``(n + 1) / 2`` as RGB), each panel under a caption, at the network's input size.
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

from mtvision.config import load_config
from mtvision.data.builders import build_dataset
from mtvision.data.sample import DataError
from mtvision.engine import autocast_context
from mtvision.engine.cli import (checkpoint_tool_parser, config_from_args, exit_on_user_error,
                                 load_trained_model)
from mtvision.engine.visualize import write_prediction_pngs

#: A folder given to --input contributes its files with these suffixes.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def expand_inputs(patterns) -> list[Path]:
    """The image files of ``--input``: a file as it is, a folder's image files (sorted), a glob pattern's
    matching files (sorted; ``**`` recursive); each file once, in the order given. FileNotFoundError for
    an entry that names nothing."""
    found: dict[Path, None] = {}
    for pattern in patterns:
        path = Path(pattern)
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not files:
            raise FileNotFoundError(f"--input {pattern}: no such file, no images in that folder, or no file "
                                    f"matching the pattern")
        found.update(dict.fromkeys(files))
    return list(found)


def unique_stems(paths) -> list[str]:
    """The output stem of each input: its file stem, with ``_2``, ``_3``, ... after a stem already taken."""
    taken: set[str] = set()
    stems = []
    for p in paths:
        stem, n = p.stem, 1
        while stem in taken:
            n += 1
            stem = f"{p.stem}_{n}"
        taken.add(stem)
        stems.append(stem)
    return stems


def predict_inputs(args) -> int:
    from tqdm import tqdm

    from mtvision.inference import Predictor
    from mtvision.inference.writers import write_predictions

    if args.onnx:
        cfg = None if args.config is None else load_config(args.config, args.overrides)
        predictor = Predictor(cfg, args.onnx, batch_size=args.batch_size)
    else:
        cfg = config_from_args(args)
        predictor = Predictor(cfg, args.checkpoint, batch_size=args.batch_size)
    paths = expand_inputs(args.input)
    stems = unique_stems(paths)
    skipped = []
    bar = tqdm(total=len(paths), unit="image", disable=args.no_progress, file=sys.stderr)
    for start in range(0, len(paths), predictor.batch_size):
        chunk = []
        for path, stem in zip(paths[start:start + predictor.batch_size], stems[start:]):
            try:
                chunk.append((path, stem, predictor.load(path)))
            except DataError as e:
                skipped.append(path)
                reason = str(e).removeprefix(f"{path}: ")  # a DataError starts with the file's name
                tqdm.write(f"skipped {path}: {reason}", file=sys.stderr)
                bar.update(1)
        predictions = predictor.batch([image for _, _, image in chunk]) if chunk else []
        for (path, stem, image), pred in zip(chunk, predictions):
            write_predictions(pred, image, args.out, stem, kinds=predictor.kinds,
                              class_names=predictor.class_names, source=str(path), depth_npy=args.depth_npy,
                              vis=not args.no_vis)
            bar.update(1)
    bar.close()
    done = len(paths) - len(skipped)
    note = f"; skipped {len(skipped)} that could not be read: {', '.join(map(str, skipped))}" * bool(skipped)
    print(f"wrote the predictions of {done} image{'s' * (done != 1)} to {args.out}{note}")
    return 1 if skipped else 0


@exit_on_user_error
def main(argv=None) -> int:
    parser = checkpoint_tool_parser(__doc__, out_help="output folder", checkpoint_required=False)
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="images to predict: files, folders, glob patterns (quote them)")
    parser.add_argument("--onnx", metavar="FILE",
                        help="with --input: run this exported file with onnxruntime")
    parser.add_argument("--depth-npy", action="store_true", help="with --input: also write <stem>_depth.npy")
    parser.add_argument("--no-vis", action="store_true", help="with --input: no <stem>_vis.png")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward pass "
                                                                     "(default data.batch_size)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--num", type=int, default=8, help="number of validation images (default 8)")
    args = parser.parse_intermixed_args(argv)
    if args.num < 1:
        parser.error("--num must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.onnx and args.checkpoint:
        parser.error("give --checkpoint or --onnx, not both")
    if not (args.onnx or args.checkpoint):
        parser.error("give --checkpoint (or --onnx with --input)")
    if args.input:
        return predict_inputs(args)
    if args.onnx:
        parser.error("--onnx predicts --input images (the validation pictures need --checkpoint)")
    cfg = config_from_args(args)
    model, _, device = load_trained_model(cfg, args.checkpoint)
    dataset = build_dataset(cfg.data, "val", cfg.seed)
    paths = write_prediction_pngs(model, dataset, args.out, args.num, mean=cfg.data.mean, std=cfg.data.std,
                                  device=device, batch_size=cfg.data.batch_size,
                                  autocast=autocast_context(cfg.train.amp, device))
    print(f"wrote {len(paths)} pictures to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
