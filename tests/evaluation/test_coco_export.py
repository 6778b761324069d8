"""Official COCO results: boxes mapped back through the evaluation transform, the results format, the
official evaluation (crowd regions ignored), and tools/eval.py --coco-export end to end."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mtvision.config import DataConfig
from mtvision.data import build_dataset, collate_samples
from mtvision.data.transforms import MultiTaskTransform, boxes_to_original
from mtvision.evaluation import DetectionMetric
from mtvision.evaluation.coco_export import OFFICIAL_KEYS, CocoResultsExporter, main, official_evaluation

from ..data.test_coco import coco_doc, write_coco

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("seed", range(6))
def test_boxes_map_back_through_scale_crop_and_flip(seed):
    rng = np.random.default_rng(seed)
    h0, w0 = 50, 70
    # scales <= 1 pad instead of cropping away: no box is clipped, so the map back is exact
    transform = MultiTaskTransform((40, 48), hflip=0.5, scale_range=(0.5, 1.0))
    xy = rng.uniform(0, 40, size=(5, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(2, 25, size=(5, 2))], axis=1).clip(0, [w0, h0, w0, h0])
    raw = {"image": np.zeros((h0, w0, 3), np.uint8), "boxes": boxes.astype(np.float32),
           "labels": np.arange(5), "meta": {}}
    out = transform(raw, rng)
    assert len(out["boxes"]) == 5
    back = boxes_to_original(torch.from_numpy(out["boxes"]), out["meta"]["transform"])
    np.testing.assert_allclose(back, boxes, atol=1e-4)


def _clean_doc():
    """The data tests' fixture with only the annotations that lie inside their image with a positive size
    (as COCO's do): the official evaluation scores the file's boxes as they are, and the pipeline
    clips or drops the others. The crowd annotation stays."""
    doc = coco_doc()
    size = {im["id"]: (im["height"], im["width"]) for im in doc["images"]}

    def inside(a):
        x, y, w, h = a["bbox"]
        H, W = size[a["image_id"]]
        return w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= W and y + h <= H

    doc["annotations"] = [a for a in doc["annotations"] if inside(a)]
    return doc


def _perfect_detections(root):
    """The validation set at 24x36 and, per image, its own (transformed) boxes as detections."""
    data = DataConfig(dataset="coco", root=str(root), tasks=["det"], num_classes=3, size=(24, 36))
    dataset = build_dataset(data, "val")
    batch = collate_samples([dataset[i] for i in range(len(dataset))])
    dets = [{"boxes": b, "scores": torch.ones(len(b)), "labels": lab}
            for b, lab in zip(batch["boxes"], batch["labels"])]
    return dataset, batch, dets


def test_perfect_detections_score_100_and_a_box_on_a_crowd_region_is_ignored(tmp_path):
    ann, _ = write_coco(tmp_path, "val", doc=_clean_doc())
    dataset, batch, dets = _perfect_detections(tmp_path)
    exporter = CocoResultsExporter(dataset.cat_ids)
    exporter.add(dets, batch["meta"])
    results = exporter.results()
    assert {r["category_id"] for r in results} <= {1, 3, 7}
    assert {r["image_id"] for r in results} <= {5, 17, 42}
    stats = official_evaluation(ann, results)
    assert set(stats) == set(OFFICIAL_KEYS)
    assert stats["AP"] == pytest.approx(100.0, abs=1e-9) and stats["AP50"] == pytest.approx(100.0, abs=1e-9)

    # the best-scored box of all on image 42's crowd region (category 1 = label 0, [0, 0, 5, 5] in the
    # original 20x30 image): ignored by the official protocol, a false positive ranked first for
    # DetectionMetric (person AP 50, car AP 100: mean 75)
    k = dataset.image_ids.tolist().index(42)
    crowd = torch.tensor([[0.0, 0.0, 5.0 * 36 / 30, 5.0 * 24 / 20]])
    with_crowd = [{**d, "scores": torch.full_like(d["scores"], 0.9)} for d in dets]
    with_crowd[k] = {"boxes": torch.cat([dets[k]["boxes"], crowd]),
                     "scores": torch.cat([with_crowd[k]["scores"], torch.tensor([1.0])]),
                     "labels": torch.cat([dets[k]["labels"], torch.tensor([0])])}
    exporter = CocoResultsExporter(dataset.cat_ids)
    exporter.add(with_crowd, batch["meta"])
    assert official_evaluation(ann, exporter.results())["AP"] == pytest.approx(100.0, abs=1e-9)
    metric = DetectionMetric(3)
    targets = [{"boxes": b, "labels": lab} for b, lab in zip(batch["boxes"], batch["labels"])]
    metric.update(with_crowd, targets)
    assert metric.compute()["AP"] == pytest.approx(75.0, abs=1e-9)


def test_written_file_is_the_results_format_and_the_module_evaluates_it(tmp_path, capsys):
    ann, _ = write_coco(tmp_path, "val", doc=_clean_doc())
    dataset, batch, dets = _perfect_detections(tmp_path)
    exporter = CocoResultsExporter(dataset.cat_ids)
    exporter.add(dets, batch["meta"])
    path = exporter.write(tmp_path / "out" / "results.json")
    written = json.loads(path.read_text())
    assert written and set(written[0]) == {"image_id", "category_id", "bbox", "score"}
    # image 42 (20x30, resized to 24x36): its car [2, 3, 10, 5] comes back in original pixels
    car = [r["bbox"] for r in written if r["image_id"] == 42 and r["category_id"] == 3]
    assert car and car[0] == pytest.approx([2, 3, 10, 5], abs=1e-4)
    assert main([str(ann), str(path)]) == 0
    assert "AP" in capsys.readouterr().out
    assert main([str(ann), str(tmp_path / "missing.json")]) == 2


def test_no_detection_scores_zero_and_no_target_nan(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(_clean_doc()))
    assert all(v == 0.0 for v in official_evaluation(ann, []).values())
    empty = _clean_doc()
    empty["annotations"] = []
    ann.write_text(json.dumps(empty))
    assert all(math.isnan(v) for v in official_evaluation(ann, []).values())


def test_exporter_needs_the_coco_meta():
    exporter = CocoResultsExporter([1])
    det = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    with pytest.raises(ValueError, match="meta needs 'image_id' and 'transform'"):
        exporter.add([det], [{"source": "x.png"}])


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"mtv_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_tool_writes_results_and_prints_the_official_numbers(tmp_path, capsys):
    from ..engine.helpers import write_tiny_config

    root = tmp_path / "coco"
    write_coco(root, "train", doc=_clean_doc())
    write_coco(root, "val", doc=_clean_doc())
    config = write_tiny_config(tmp_path)
    overrides = ["data.dataset=coco", f"data.root={root}", "data.num_classes=3", "data.tasks=[det]",
                 "data.batch_size=3", "data.size=[64,64]",
                 "model.heads={det: {name: fcos, num_classes: 3, channels: 16, num_convs: 1}}"]
    assert _tool("train").main([str(config), "--no-progress", *overrides, "train.max_iters=2",
                                "train.eval_interval=2"]) == 0
    capsys.readouterr()
    out = tmp_path / "results.json"
    rc = _tool("eval").main([str(config), "--checkpoint", str(tmp_path / "work" / "checkpoints" / "last.pth"),
                             "--coco-export", str(out), "--out", str(tmp_path / "m.json"), *overrides])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "official COCO evaluation" in printed and "AR100" in printed
    results = json.loads(out.read_text())
    assert all(r["category_id"] in (1, 3, 7) for r in results)
    summary = json.loads((tmp_path / "m.json").read_text())
    assert set(summary["coco_official"]) == set(OFFICIAL_KEYS)
    assert all(v is None or 0 <= v <= 100 for v in summary["coco_official"].values())
    # not a COCO dataset: a clear error before any work
    rc = _tool("eval").main([str(config), "--checkpoint", str(tmp_path / "work" / "checkpoints" / "last.pth"),
                             "--coco-export", str(out), *overrides, "data.dataset=synthetic", "data.root=null"])
    assert rc == 2
    assert "--coco-export: needs data.dataset=coco" in capsys.readouterr().err
