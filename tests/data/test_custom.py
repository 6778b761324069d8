"""FolderDataset ("custom"): PNG / npy label folders read back exactly; bad files fail naming the file."""

import re

import cv2
import numpy as np
import pytest
import torch

from mtvision.config import ConfigError, DataConfig
from mtvision.data import DATASETS, FolderDataset, build_dataset, collate_samples
from mtvision.data.sample import DataError, SkippedSample

from . import fixtures as F

IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def test_png_round_trip(tmp_path):
    written = F.write_custom(tmp_path, "train", stems=("b", "a"), size=(5, 7))
    ds = FolderDataset(tmp_path, "train", **IDENTITY)
    assert DATASETS["custom"] is FolderDataset
    assert len(ds) == 2 and ds.classes == ("thing0", "thing1", "thing2", "thing3") and ds.num_classes == 4
    for k, stem in enumerate(("a", "b")):  # sorted by name
        raw = ds.read_raw(k)
        exp = written[stem]
        assert raw["meta"]["stem"] == stem and raw["meta"]["size"] == (5, 7)
        assert raw["image"].shape == (5, 7, 3) and np.array_equal(raw["image"], exp["image"])  # RGB order
        assert np.array_equal(raw["seg"], exp["seg"]) and raw["seg"][0, 0] == 255
        assert raw["depth"].dtype == np.float32 and np.array_equal(raw["depth"], exp["depth"])
        assert raw["depth"][2, 1] == 0
        np.testing.assert_allclose(raw["normal"], exp["normal"], atol=0.01)  # 8-bit quantisation
        norms = np.linalg.norm(raw["normal"], axis=2)
        np.testing.assert_allclose(norms[exp["normal"].any(axis=2)], 1, atol=1e-5)
        assert (raw["normal"][3, 2] == 0).all()
        sample = ds[k]
        assert torch.allclose(sample["image"], torch.from_numpy(exp["image"]).permute(2, 0, 1).float() / 255)
        assert torch.equal(sample["seg"], torch.from_numpy(exp["seg"]))
        assert sample["normal"].shape == (3, 5, 7) and sample["depth"].shape == (1, 5, 7)


def test_npy_depth_and_normals_16bit_seg_and_depth_scale(tmp_path):
    written = F.write_custom(tmp_path, "val", stems=("x",), depth_format="npy", normal_format="npy",
                             seg_bits=16, num_classes=300, classes=False)
    raw = FolderDataset(tmp_path, "val", num_classes=300).read_raw(0)
    exp = written["x"]
    assert raw["seg"].dtype == np.int32 and np.array_equal(raw["seg"], exp["seg"])
    assert np.array_equal(raw["depth"], exp["depth"])
    np.testing.assert_allclose(raw["normal"], exp["normal"], atol=1e-6)
    written = F.write_custom(tmp_path / "cm", "val", stems=("x",), tasks=("depth",), depth_scale=256.0)
    ds = FolderDataset(tmp_path / "cm", "val", tasks=("depth",), depth_scale=256.0)
    assert np.array_equal(ds.read_raw(0)["depth"], written["x"]["depth"])


def test_jpg_images_and_only_requested_tasks(tmp_path):
    F.write_custom(tmp_path, "train", stems=("a",), tasks=("seg",))
    img = cv2.imread(str(tmp_path / "train" / "images" / "a.png"))
    (tmp_path / "train" / "images" / "a.png").unlink()
    assert cv2.imwrite(str(tmp_path / "train" / "images" / "a.jpg"), img)
    sample = FolderDataset(tmp_path, "train", tasks=("seg",))[0]
    assert set(sample) == {"image", "seg", "meta"} and sample["image"].shape == (3, 5, 7)
    with pytest.raises(ConfigError, match=r"data.tasks: task 'depth' .*train/depth"):
        FolderDataset(tmp_path, "train", tasks=("seg", "depth"))


def test_missing_label_file_names_the_expected_path(tmp_path):
    written = F.write_custom(tmp_path, "train", stems=("a", "b"))
    (tmp_path / "train" / "depth" / "b.png").unlink()
    ds = FolderDataset(tmp_path, "train")
    assert torch.equal(ds[0]["depth"][0], torch.from_numpy(written["a"]["depth"]))  # "a" is complete
    with pytest.raises(DataError, match=r"label file not found \(or b.npy\)") as e:
        ds[1]
    assert e.value.path == str(tmp_path / "train" / "depth" / "b.png") and e.value.field == "depth"
    skipped = FolderDataset(tmp_path, "train", skip_bad=True)[1]
    assert isinstance(skipped, SkippedSample) and skipped.index == 1
    assert skipped.reason.startswith(str(tmp_path / "train" / "depth" / "b.png") + ": depth: label file not found")


def test_corrupt_file_and_out_of_range_label(tmp_path):
    F.write_custom(tmp_path, "train", stems=("a", "b"), num_classes=4)
    seg = tmp_path / "train" / "seg" / "a.png"
    labels = cv2.imread(str(seg), cv2.IMREAD_UNCHANGED)
    labels[2, 3] = 4
    assert cv2.imwrite(str(seg), labels)
    normal = tmp_path / "train" / "normal" / "b.png"
    normal.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ds = FolderDataset(tmp_path, "train")
    with pytest.raises(DataError, match=r"\[4\] out of range: expected 0..3") as e:
        ds[0]
    assert e.value.path == str(seg) and e.value.field == "seg"
    with pytest.raises(DataError, match="cannot decode") as e:
        ds[1]
    assert e.value.path == str(normal) and e.value.field == "normal"
    skipping = FolderDataset(tmp_path, "train", skip_bad=True)
    batch = collate_samples([skipping[0], skipping[1]])
    assert set(batch) == {"num_skipped", "skipped_files"} and batch["num_skipped"] == 2
    assert [r.split(": ")[0] for r in batch["skipped_files"]] == [str(seg), str(normal)]


def test_wrong_shape_names_the_label_file(tmp_path):
    F.write_custom(tmp_path, "train", stems=("a",), tasks=("depth",))
    depth = tmp_path / "train" / "depth" / "a.png"
    F.write_gray_png(depth, np.ones((7, 5), np.uint16))  # transposed
    with pytest.raises(DataError, match=r"expected shape \(5, 7\)") as e:
        FolderDataset(tmp_path, "train", tasks=("depth",))[0]
    assert e.value.path == str(depth)


def test_exr_normals(tmp_path):
    F.write_custom(tmp_path, "train", stems=("a",), tasks=("normal",), normal_format="npy")
    n = np.load(tmp_path / "train" / "normal" / "a.npy")
    (tmp_path / "train" / "normal" / "a.npy").unlink()
    exr = tmp_path / "train" / "normal" / "a.exr"
    if cv2.haveImageWriter(str(exr)):
        assert cv2.imwrite(str(exr), np.ascontiguousarray(n[..., ::-1]))
        raw = FolderDataset(tmp_path, "train", tasks=("normal",)).read_raw(0)
        np.testing.assert_allclose(raw["normal"], n, atol=1e-3)
    else:  # this OpenCV build cannot decode OpenEXR: the error says so and what to do instead
        exr.write_bytes(b"v/1\x01 not really an exr")
        with pytest.raises(DataError, match="OpenEXR.*convert the normals to .npy") as e:
            FolderDataset(tmp_path, "train", tasks=("normal",))[0]
        assert e.value.path == str(exr)


def test_config_errors(tmp_path):
    F.write_custom(tmp_path, "train", stems=("a",), num_classes=4)
    with pytest.raises(ConfigError, match=r"data.num_classes: 5 classes, but .*classes.txt lists 4"):
        FolderDataset(tmp_path, "train", num_classes=5)
    with pytest.raises(ConfigError, match="data.root: the images of split 'val'"):
        FolderDataset(tmp_path, "val")
    with pytest.raises(ConfigError, match="data.tasks: .*'boxes'"):
        FolderDataset(tmp_path, "train", tasks=("boxes",))
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(ConfigError, match="data.num_classes"):
        FolderDataset(tmp_path, "train")
    assert FolderDataset(tmp_path, "train", tasks=("depth",)).classes == ()


def test_from_config_and_build_dataset(tmp_path):
    written = F.write_custom(tmp_path, "train", stems=("a", "b"), num_classes=4)
    F.write_custom(tmp_path, "val", stems=("c",), num_classes=4)
    data = DataConfig(dataset="custom", root=str(tmp_path), num_classes=4, tasks=["seg", "depth"],
                      kwargs={"depth_scale": 1000}, size=(5, 7))
    ds = FolderDataset.from_config(data, "train", transform=None, seed=0)
    assert set(ds[1]) == {"image", "seg", "depth", "meta"}
    assert torch.equal(ds[1]["seg"], torch.from_numpy(written["b"]["seg"]))
    data.kwargs = {"depth_scal": 1000}
    with pytest.raises(ConfigError, match="data.kwargs.depth_scal"):
        FolderDataset.from_config(data, "train", transform=None, seed=0)
    data.kwargs = {"depth_scale": -1}
    with pytest.raises(ConfigError, match="data.kwargs.depth_scale"):
        FolderDataset.from_config(data, "train", transform=None, seed=0)
    pytest.importorskip("mtvision.data.transforms")

    data.kwargs = {}
    val = build_dataset(data, "val")
    assert isinstance(val, FolderDataset) and len(val) == 1 and val[0]["seg"].shape == (5, 7)


def test_box_files_read_back_clipped_with_their_class_ids(tmp_path):
    written = F.write_custom(tmp_path, "train", stems=("a", "b"), size=(6, 8), tasks=("seg", "det"))
    ds = FolderDataset(tmp_path, "train", tasks=("seg", "det"), **IDENTITY)
    for k, stem in enumerate(("a", "b")):
        raw = ds.read_raw(k)
        np.testing.assert_array_equal(raw["boxes"], written[stem]["boxes"])
        assert raw["boxes"][1, 2] == 8.0  # 8.5 clipped to the 8-pixel-wide image
        assert raw["labels"].tolist() == written[stem]["labels"].tolist()
        assert raw["meta"]["files"][-1].endswith(f"det/{stem}.txt")
    (tmp_path / "train" / "det" / "a.txt").write_text("# nothing here\n")
    empty = ds.read_raw(0)
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    # through the config: boxes scaled with the image, collated as lists
    data = DataConfig(dataset="custom", root=str(tmp_path), tasks=["seg", "det"], num_classes=4, size=(12, 16))
    batch = collate_samples([build_dataset(data, "train")[i] for i in range(2)])
    assert isinstance(batch["boxes"], list) and batch["seg"].shape == (2, 12, 16)
    torch.testing.assert_close(batch["boxes"][1], torch.from_numpy(written["b"]["boxes"]) * 2)


@pytest.mark.parametrize("line, message", [
    ("1 2 3 4", r"det line 1: expected 'class_id x1 y1 x2 y2', got '1 2 3 4'"),
    ("a 0 0 2 2", r"det line 1: expected 'class_id x1 y1 x2 y2'"),
    ("4 0 0 2 2", r"det line 1: class id 4 outside \[0, 4\)"),
    ("0 3 0 2 2", r"det line 1: expected x1 < x2 and y1 < y2"),
    ("0 0 0 9.5 2", r"det line 1: box \[0.0, 0.0, 9.5, 2.0\] lies outside the 8x6 image"),
])
def test_bad_box_lines_name_the_file_and_line(tmp_path, line, message):
    F.write_custom(tmp_path, "train", stems=("a",), size=(6, 8), tasks=("det",))
    path = tmp_path / "train" / "det" / "a.txt"
    path.write_text(line + "\n")
    with pytest.raises(DataError, match=re.escape(str(path)) + ": " + message):
        FolderDataset(tmp_path, "train", tasks=("det",)).read_raw(0)


def test_data_kwargs_are_checked_against_the_constructor(tmp_path):
    F.write_custom(tmp_path, "train", stems=("a",))
    base = dict(dataset="custom", root=str(tmp_path), num_classes=4)
    with pytest.raises(ConfigError, match=r"data.kwargs.depth_scal: unexpected argument for the custom dataset "
                                          r"\(accepted: depth_scale\)"):
        build_dataset(DataConfig(**base, kwargs={"depth_scal": 1000}), "train")
    with pytest.raises(ConfigError, match=r"data.kwargs.seed: set automatically for the custom dataset"):
        build_dataset(DataConfig(**base, kwargs={"seed": 3}), "train")
    assert build_dataset(DataConfig(**base, kwargs={"depth_scale": 500.0}), "train").depth_scale == 500.0
