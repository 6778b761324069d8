"""Cityscapes loader on a tiny fixture in the official formats: label ids -> 19 train ids / 7 categories
through cityscapesscripts' table, depth from disparity + camera JSON, meta, config, and bad files."""

import json
import re

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import id2label, labels, trainId2label

from mtvision.config import ConfigError, DataConfig
from mtvision.data import DATASETS, Cityscapes, collate_samples
from mtvision.data.cityscapes import cityscapes_classes, label_id_lut
from mtvision.data.sample import DataError, SkippedSample

from .cityscapes_fixture import write_cityscapes

CATEGORIES = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    return root, write_cityscapes(root, "val")


def expected_seg(label_ids, num_classes):
    out = np.full(label_ids.shape, 255, dtype=np.int64)
    for lid in np.unique(label_ids):
        lb = id2label[int(lid)]
        if not lb.ignoreInEval:
            out[label_ids == lid] = lb.trainId if num_classes == 19 else CATEGORIES.index(lb.category)
    return out


def test_classes_come_from_the_label_table():
    assert cityscapes_classes(19) == tuple(trainId2label[t].name for t in range(19))
    assert cityscapes_classes(19)[:3] == ("road", "sidewalk", "building")
    assert cityscapes_classes(7) == CATEGORIES
    with pytest.raises(ValueError, match="19 or 7"):
        cityscapes_classes(8)
    lut19, lut7 = label_id_lut(19), label_id_lut(7)
    for lb in labels:
        if lb.id < 0:
            continue
        # ignoreInEval <=> no train id in the official table
        assert (lut19[lb.id] == 255) == lb.ignoreInEval == (lb.trainId in (255, -1))
        if not lb.ignoreInEval:
            assert lut19[lb.id] == lb.trainId
            assert lut7[lb.id] == lb.categoryId - 1  # flat (categoryId 1) -> 0 ... vehicle (7) -> 6
        else:
            assert lut7[lb.id] == 255
    assert (lut19[34:] == -1).all() and (lut7[34:] == -1).all()


@pytest.mark.parametrize("num_classes", [19, 7])
def test_round_trip_of_labels_depth_and_meta(tree, num_classes):
    root, written = tree
    ds = Cityscapes(root, "val", num_classes=num_classes)
    assert len(ds) == 3 and ds.classes == cityscapes_classes(num_classes)
    for i, w in enumerate(written):
        s = ds[i]
        np.testing.assert_array_equal(s["seg"].numpy(), expected_seg(w["label_ids"], num_classes))
        assert s["seg"].dtype == torch.int64 and s["image"].shape == (3, 32, 64)
        m = s["meta"]
        assert m["stem"] == w["stem"] and m["city"] == w["city"] and m["size"] == (32, 64)
        assert m["source"] == str(w["paths"]["image"])
        assert m["files"] == [str(w["paths"][k]) for k in ("image", "seg", "disparity", "camera")]
        # the image is read as RGB and normalised with the default ImageNet mean/std
        img = s["image"].permute(1, 2, 0).numpy() * np.array(ds.std) + np.array(ds.mean)
        np.testing.assert_allclose(img * 255.0, w["image"], atol=1e-3)
    # 7 categories = 19 train ids grouped by their category
    if num_classes == 7:
        seg19 = Cityscapes(root, "val", num_classes=19, tasks=["seg"])[0]["seg"].numpy()
        seg7 = ds[0]["seg"].numpy()
        valid = seg19 != 255
        assert ((seg7 == 255) == ~valid).all()
        groups = np.array([CATEGORIES.index(trainId2label[t].category) for t in range(19)])
        np.testing.assert_array_equal(seg7[valid], groups[seg19[valid]])


def test_depth_from_disparity(tree):
    root, written = tree
    ds = Cityscapes(root, "val", tasks=["depth"])
    for i, w in enumerate(written):
        s = ds[i]
        assert "seg" not in s and s["depth"].shape == (1, 32, 64)
        depth = s["depth"][0].numpy()
        baseline, fx = w["camera"]["extrinsic"]["baseline"], w["camera"]["intrinsic"]["fx"]
        p = w["disparity"].astype(np.float64)
        expected = np.where(p > 1, baseline * fx / ((np.maximum(p, 2) - 1) / 256.0), 0.0)
        np.testing.assert_allclose(depth, expected, rtol=1e-6)
        assert (depth[0, :4] == 0).all() and (depth[1, :4] == 0).all()  # p = 0 and p = 1: invalid
        assert depth[2, 0] == pytest.approx(baseline * fx, rel=1e-6)  # p = 257: d = 1 pixel
        assert (depth[3:] > 0).all()


def test_only_the_files_of_the_tasks_are_read(tmp_path):
    write_cityscapes(tmp_path, "val", cities=(("ulm", 1),))
    for kind in ("disparity", "camera"):
        for f in (tmp_path / kind).rglob("*.*"):
            f.unlink()
    s = Cityscapes(tmp_path, "val", tasks=["seg"])[0]
    assert set(s) == {"image", "seg", "meta"} and len(s["meta"]["files"]) == 2
    with pytest.raises(DataError, match="disparity.png: depth: file not found"):
        Cityscapes(tmp_path, "val", tasks=["seg", "depth"])[0]


def test_registered_and_from_config(tree):
    root, _ = tree
    assert DATASETS["cityscapes"] is Cityscapes
    data = DataConfig(dataset="cityscapes", root=str(root), num_classes=7, tasks=["seg", "depth"])
    ds = Cityscapes.from_config(data, "val", transform=None, seed=3)
    assert ds.num_classes == 7 and ds.seed == 3 and ds.tasks == ("seg", "depth")
    batch = collate_samples([ds[0], ds[1]])
    assert batch["seg"].shape == (2, 32, 64) and batch["depth"].shape == (2, 1, 32, 64)
    assert [m["stem"] for m in batch["meta"]] == [ds[0]["meta"]["stem"], ds[1]["meta"]["stem"]]


def test_build_dataset_resizes_and_keeps_the_original_size(tree):
    pytest.importorskip("mtvision.data.transforms")
    from mtvision.data import build_dataset

    root, _ = tree
    data = DataConfig(dataset="cityscapes", root=str(root), num_classes=19, tasks=["seg", "depth"],
                      size=(16, 32), val_split="val")
    s = build_dataset(data, "val")[0]
    assert s["image"].shape == (3, 16, 32) and s["seg"].shape == (16, 32)
    assert s["meta"]["size"] == (32, 64)


@pytest.mark.parametrize("change, message", [
    ({"kwargs": {"eigen_crop": True}}, "data.kwargs.eigen_crop"),
    ({"num_classes": 20}, "data.num_classes"),
    ({"tasks": ["seg", "normal"]}, "data.tasks"),
])
def test_config_errors_name_the_key(tree, change, message):
    root, _ = tree
    data = DataConfig(**{"dataset": "cityscapes", "root": str(root), "num_classes": 19, **change})
    with pytest.raises(ConfigError, match=message):
        Cityscapes.from_config(data, "val", transform=None, seed=0)


def test_missing_split_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="leftImg8bit/train"):
        Cityscapes(tmp_path, "train")


def _broken_copy(tmp_path):
    written = write_cityscapes(tmp_path, "val", cities=(("ulm", 1),))
    return written[0]["paths"]


@pytest.mark.parametrize("breakage, field, message", [
    ("corrupt_image", "image", "cannot decode"),
    ("corrupt_label", "seg", "cannot decode"),
    ("missing_label", "seg", "file not found"),
    ("unknown_id", "seg", r"label id\(s\) \[40\] unknown to the Cityscapes label table"),
    ("label_16bit", "seg", "expected an 8-bit label-id PNG"),
    ("disparity_8bit", "depth", "expected a 16-bit disparity PNG"),
    ("no_baseline", "depth", "camera JSON without extrinsic.baseline"),
    ("bad_fx", "depth", "intrinsic.fx must be a positive number"),
])
def test_bad_files_raise_naming_the_file(tmp_path, breakage, field, message):
    import cv2

    paths = _broken_copy(tmp_path)
    bad = {"corrupt_image": "image", "corrupt_label": "seg", "missing_label": "seg", "unknown_id": "seg",
           "label_16bit": "seg", "disparity_8bit": "disparity", "no_baseline": "camera",
           "bad_fx": "camera"}[breakage]
    path = paths[bad]
    if breakage.startswith("corrupt"):
        path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    elif breakage == "missing_label":
        path.unlink()
    elif breakage == "unknown_id":
        ids = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        ids[5, 7] = 40
        cv2.imwrite(str(path), ids)
    elif breakage in ("label_16bit", "disparity_8bit"):
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(path), img.astype(np.uint16 if breakage == "label_16bit" else np.uint8))
    else:
        cam = json.loads(path.read_text())
        if breakage == "no_baseline":
            del cam["extrinsic"]["baseline"]
        else:
            cam["intrinsic"]["fx"] = "2262"
        path.write_text(json.dumps(cam))
    ds = Cityscapes(tmp_path, "val")
    with pytest.raises(DataError, match=message) as info:
        ds[0]
    assert info.value.path == str(path) and info.value.field == field
    assert str(path) in str(info.value)
    # with skip_bad the sample is skipped, its reason naming the file
    skipped = Cityscapes(tmp_path, "val", skip_bad=True)[0]
    assert isinstance(skipped, SkippedSample) and skipped.index == 0 and re.search(message, skipped.reason)
