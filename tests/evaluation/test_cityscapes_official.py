"""The Cityscapes export scored by the official script (cityscapesscripts, run in-process) equals our
SegmentationMetric on the same full-resolution predictions: per class, mIoU, and the 7 categories."""

import math

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import name2label, trainId2label
from PIL import Image

from mtvision.data import Cityscapes
from mtvision.evaluation import SegmentationMetric
from mtvision.evaluation.cityscapes_export import (CityscapesExporter, official_evaluation,
                                                   prediction_filename, train_ids_to_label_ids,
                                                   upsample_prediction)

from ..data.cityscapes_fixture import FIXTURE_IDS, write_cityscapes

BUS, TRAIN, RIDER = (name2label[n].trainId for n in ("bus", "train", "rider"))
CATEGORIES = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Fixture without bus and train in the ground truth; predictions at half resolution (16x32) that
    never say bus (absent from both: NaN on both sides), say train in a block (absent from the GT only:
    IoU 0) and never say rider (in the GT only: IoU 0)."""
    root = tmp_path_factory.mktemp("cs")
    ids = [i for i in FIXTURE_IDS if i not in (name2label["bus"].id, name2label["train"].id)]
    write_cityscapes(root, "val", cities=(("aachen", 2), ("bochum", 2)), ids=ids, seed=1)
    ds = Cityscapes(root, "val", num_classes=19, tasks=["seg"])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(ds), 19, 16, 32, generator=g) * 3.0
    logits[:, BUS] = -100.0
    logits[:, RIDER] = -100.0
    logits[:, TRAIN, 2:6, 4:12] = 100.0
    metas = [ds[i]["meta"] for i in range(len(ds))]
    out = root / "results"
    exporter = CityscapesExporter(out)
    paths = exporter.add(logits[:3], metas[:3]) + exporter.add(logits[3:], metas[3:])  # two batches
    return root, ds, logits, out, paths


def test_exported_files_are_label_id_pngs_at_full_size(exported):
    root, ds, logits, out, paths = exported
    assert [p.name for p in paths] == [prediction_filename(ds[i]["meta"]["stem"]) for i in range(len(ds))]
    assert paths[0].name == "aachen_000000_000019_pred.png"
    train_label_ids = {trainId2label[t].id for t in range(19)}
    for i, p in enumerate(paths):
        img = Image.open(p)
        assert img.mode == "L" and img.size == (64, 32)
        ids = np.array(img)
        assert set(np.unique(ids)) <= train_label_ids
        np.testing.assert_array_equal(ids, train_ids_to_label_ids(upsample_prediction(logits[i], (32, 64))))


def test_official_miou_equals_segmentation_metric(exported):
    root, ds, logits, out, _ = exported
    ours = SegmentationMetric(19)
    for i in range(len(ds)):
        pred = upsample_prediction(logits[i], ds[i]["meta"]["size"])
        ours.update(pred[None], ds[i]["seg"][None])
    ours = ours.compute()
    official = official_evaluation(root, out)
    for t in range(19):
        theirs = official["classScores"][trainId2label[t].name]
        assert math.isnan(theirs) == math.isnan(ours["IoU"][t]), trainId2label[t].name
        if not math.isnan(theirs):
            assert 100.0 * theirs == pytest.approx(ours["IoU"][t], rel=1e-12), trainId2label[t].name
    assert math.isnan(ours["IoU"][BUS]) and ours["IoU"][TRAIN] == 0.0 and ours["IoU"][RIDER] == 0.0
    assert 100.0 * official["averageScoreClasses"] == pytest.approx(ours["mIoU"], rel=1e-12)


def test_official_categories_equal_the_7_class_metric(exported):
    """The 7-class loader's grouping is the official script's category IoU."""
    root, _, logits, out, _ = exported
    ds7 = Cityscapes(root, "val", num_classes=7, tasks=["seg"])
    assert ds7.classes == CATEGORIES
    group = torch.tensor([CATEGORIES.index(trainId2label[t].category) for t in range(19)])
    ours = SegmentationMetric(7)
    for i in range(len(ds7)):
        ours.update(group[upsample_prediction(logits[i], (32, 64))][None], ds7[i]["seg"][None])
    ours = ours.compute()
    official = official_evaluation(root, out)
    assert math.isnan(official["categoryScores"]["void"])
    for c, name in enumerate(CATEGORIES):
        assert 100.0 * official["categoryScores"][name] == pytest.approx(ours["IoU"][c], rel=1e-12), name
    assert 100.0 * official["averageScoreCategories"] == pytest.approx(ours["mIoU"], rel=1e-12)


def test_errors(exported, tmp_path):
    root, _, logits, out, paths = exported
    with pytest.raises(ValueError, match="19 train-id classes"):
        CityscapesExporter(tmp_path / "x", num_classes=7)
    exporter = CityscapesExporter(tmp_path / "y")
    meta = {"stem": "ulm_000000_000019", "size": (32, 64)}
    exporter.add(logits[:1], [meta])
    with pytest.raises(ValueError, match="already written"):
        exporter.add(logits[:1], [meta])
    with pytest.raises(ValueError, match="lacks 'stem'"):
        exporter.add(logits[:1], [{"size": (32, 64)}])
    # a results folder missing a prediction: the script's own message, as an exception
    with pytest.raises(RuntimeError, match="Found no prediction for ground truth"):
        official_evaluation(root, tmp_path / "y")
