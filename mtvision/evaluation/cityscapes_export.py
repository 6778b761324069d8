"""Cityscapes predictions in the official result format, and the official pixel-level evaluation.

The official script (``cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling``) scores one PNG per
validation image, of the image's full size (1024x2048), whose pixels are *label ids* (not train ids), and
finds the prediction of ``{city}_{seq}_{frame}_gtFine_labelIds.png`` by searching its results folder
recursively for ``{city}_{seq}_{frame}*.png``. :class:`CityscapesExporter` writes
``{city}_{seq}_{frame}_pred.png`` (8-bit, label ids) for each image of a batch.

Upsampling: the model's logits (at the config's ``data.size``) are resized **bilinearly** to the
image's original size, then the argmax is taken (as mmsegmentation and most Cityscapes evaluations do);
this scores the full-resolution boundaries the logits imply rather than blocky nearest-neighbour labels.

``python -m mtvision.evaluation.cityscapes_export CITYSCAPES_ROOT RESULTS_DIR [--split val]`` runs the
official script's own functions on an exported folder (see :func:`official_evaluation`).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CityscapesExporter", "official_evaluation", "prediction_filename", "train_ids_to_label_ids",
           "upsample_prediction"]

NUM_TRAIN_CLASSES = 19


def _train_to_label_id() -> np.ndarray:
    from cityscapesscripts.helpers.labels import trainId2label

    return np.array([trainId2label[t].id for t in range(NUM_TRAIN_CLASSES)], dtype=np.uint8)


def train_ids_to_label_ids(train_ids) -> np.ndarray:
    """``uint8`` label ids of a map of train ids ``0..18`` (numpy or tensor), through the label table."""
    t = train_ids.cpu().numpy() if isinstance(train_ids, torch.Tensor) else np.asarray(train_ids)
    if t.size and (t.min() < 0 or t.max() >= NUM_TRAIN_CLASSES):
        raise ValueError(f"train_ids_to_label_ids: train ids must be in [0, {NUM_TRAIN_CLASSES}), got "
                         f"values in [{t.min()}, {t.max()}]")
    return _train_to_label_id()[t]


def upsample_prediction(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Class map ``int64 [H, W]`` of one image's logits ``[C, h, w]``: bilinear resize to ``size = (H, W)``
    (``align_corners=False``) in float32, then argmax over classes."""
    if logits.dim() != 3:
        raise ValueError(f"upsample_prediction: expected logits [C, h, w], got shape {tuple(logits.shape)}")
    h, w = int(size[0]), int(size[1])
    x = logits.float()[None]
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x[0].argmax(0)


def prediction_filename(stem: str) -> str:
    """``{city}_{seq}_{frame}_pred.png``: matched by the official script's ``{city}_{seq}_{frame}*.png``."""
    return f"{stem}_pred.png"


class CityscapesExporter:
    """Writes every prediction of a 19-class model as an official result PNG into ``out_dir``.

    ``add(seg_logits [B, 19, h, w], metas)``: ``metas[i]`` needs ``stem`` (``{city}_{seq}_{frame}``) and
    ``size`` (original ``(H, W)``), as :class:`mtvision.data.cityscapes.Cityscapes` puts in ``meta``.
    Returns the files written. ``num_written`` counts them; writing the same stem twice is an error (the
    official script refuses several predictions for one image).
    """

    def __init__(self, out_dir, num_classes: int = NUM_TRAIN_CLASSES):
        if num_classes != NUM_TRAIN_CLASSES:
            raise ValueError(f"the Cityscapes export needs the {NUM_TRAIN_CLASSES} train-id classes (the "
                             f"official evaluation scores label ids), got num_classes={num_classes}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._written: set[str] = set()

    @property
    def num_written(self) -> int:
        return len(self._written)

    @torch.no_grad()
    def add(self, seg_logits: torch.Tensor, metas: Sequence[Mapping]) -> list[Path]:
        import cv2

        if seg_logits.dim() != 4 or seg_logits.shape[1] != NUM_TRAIN_CLASSES:
            raise ValueError(f"CityscapesExporter.add: expected logits [B, {NUM_TRAIN_CLASSES}, h, w], got "
                             f"shape {tuple(seg_logits.shape)}")
        if len(metas) != seg_logits.shape[0]:
            raise ValueError(f"CityscapesExporter.add: {len(metas)} metas for {seg_logits.shape[0]} "
                             f"predictions")
        paths = []
        for logits, meta in zip(seg_logits, metas):
            if "stem" not in meta or "size" not in meta:
                raise ValueError(f"CityscapesExporter.add: meta of {meta.get('source', '?')} lacks 'stem' / "
                                 f"'size' (use the cityscapes dataset)")
            stem = str(meta["stem"])
            if stem in self._written:
                raise ValueError(f"CityscapesExporter.add: a prediction for {stem} was already written")
            label_ids = train_ids_to_label_ids(upsample_prediction(logits, meta["size"]))
            path = self.out_dir / prediction_filename(stem)
            if not cv2.imwrite(str(path), label_ids):
                raise OSError(f"cannot write {path}")
            self._written.add(stem)
            paths.append(path)
        return paths


def official_evaluation(cityscapes_root, results_dir, split: str = "val", quiet: bool = True) -> dict:
    """Run cityscapesscripts' pixel-level evaluation on ``results_dir`` against
    ``cityscapes_root/gtFine/{split}/*/*_gtFine_labelIds.png``, in this process.

    Uses the script's own ``getPrediction`` (file matching) and ``evaluateImgLists`` (confusion matrix,
    IoU), with its JSON file output off and its instance-level scores (nIoU) off: those need the
    ``*_instanceIds.png`` files and ``np.in1d``, which NumPy 2.4 removed. Returns the script's result
    dict: ``averageScoreClasses`` (mIoU over the 19 classes, a fraction), ``classScores`` (IoU per label
    name, NaN for ignored / absent classes), ``averageScoreCategories``, ``categoryScores``,
    ``confMatrix``. An error of the script (no prediction for an image, size mismatch, ...) is raised
    as RuntimeError with its message.
    """
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev

    gt_search = os.path.join(str(cityscapes_root), "gtFine", split, "*", "*_gtFine_labelIds.png")
    args = ev.CArgs()
    for k, v in vars(ev.args).items():  # the script's defaults, then ours
        setattr(args, k, v)
    args.cityscapesPath = str(cityscapes_root)
    args.groundTruthSearch = gt_search
    args.predictionPath = str(results_dir)
    args.predictionWalk = None
    args.evalInstLevelScore = False
    args.evalPixelAccuracy = False
    args.JSONOutput = False
    args.colorized, args.bold, args.nocol = False, "", ""
    args.quiet = quiet
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext():
            gts = sorted(glob.glob(gt_search))
            if not gts:
                raise RuntimeError(f"official_evaluation: no ground truth found (searched {gt_search})")
            if not Path(results_dir).is_dir():
                raise RuntimeError(f"official_evaluation: no results folder {results_dir}")
            preds = [ev.getPrediction(args, gt) for gt in gts]
            return ev.evaluateImgLists(preds, gts, args)
    except SystemExit as e:  # the script's printError() prints "ERROR: ..." and exits
        lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
        raise RuntimeError(f"cityscapesscripts evaluation failed: {lines[-1] if lines else e}") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Official Cityscapes pixel-level evaluation (cityscapesscripts) of an exported folder")
    parser.add_argument("cityscapes_root", help="folder holding gtFine/")
    parser.add_argument("results_dir", help="folder of *_pred.png label-id images (tools/eval.py "
                                            "--cityscapes-export)")
    parser.add_argument("--split", default="val")
    args = parser.parse_args(argv)
    try:
        result = official_evaluation(args.cityscapes_root, args.results_dir, args.split, quiet=False)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"official mIoU (classes): {100 * result['averageScoreClasses']:.2f}   "
          f"(categories): {100 * result['averageScoreCategories']:.2f}\n"
          f"(the nIoU column above is not computed: instance-level scoring is off, see official_evaluation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
