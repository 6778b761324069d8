"""NYUv2 loader: both layouts read back what the fixtures wrote, bad files fail naming the file."""

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mtvision.config import ConfigError, DataConfig
from mtvision.data import DATASETS, NYUV2_CLASSES, NYUv2, collate_samples
from mtvision.data.nyuv2 import (EIGEN_CROP, _load_mat_field, eigen_crop_box, load_class_mapping40,
                                 nyu40_to_13_lut)
from mtvision.data.sample import DataError, SkippedSample

from . import fixtures as F

IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


@pytest.fixture
def npy_root(tmp_path):
    expected = F.write_nyuv2_npy(tmp_path, "train", n=3)
    return tmp_path, expected


@pytest.fixture
def mat_root(tmp_path):
    return tmp_path, F.write_nyuv2_mat(tmp_path)


def _expected_seg(written, i):
    """13-class ids of image i of the .mat fixture, through mapClass and the shipped 40 -> 13 table."""
    raw = written["raw_labels"][i]
    map40 = np.concatenate([[0], written["map40"]])[raw]
    return nyu40_to_13_lut()[map40]


def test_classes_and_40_to_13_table():
    assert NYUV2_CLASSES == ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture",
                             "sofa", "table", "tv", "wall", "window")
    assert NYUv2.num_classes == 13 and DATASETS["nyuv2"] is NYUv2
    lut = nyu40_to_13_lut()
    name = {c: i for i, c in enumerate(NYUV2_CLASSES)}
    # 40-class ids (Gupta et al.): 1 wall, 2 floor, 3 cabinet, 8 door, 13 blinds, 20 floor mat, 23 books,
    # 25 television, 39 other furniture, 40 other prop; 0 = unlabelled
    assert lut[0] == 255 and lut.shape == (41,)
    for id40, cls in ((1, "wall"), (2, "floor"), (3, "furniture"), (4, "bed"), (8, "wall"), (13, "window"),
                      (20, "floor"), (22, "ceiling"), (23, "books"), (25, "tv"), (39, "furniture"),
                      (40, "objects")):
        assert lut[id40] == name[cls], id40
    assert set(lut[1:].tolist()) == set(range(13))


def test_npy_round_trip_numeric_order(tmp_path):
    expected = F.write_nyuv2_npy(tmp_path, "train", n=12, depth_hw1=True)
    ds = NYUv2(tmp_path, "train", **IDENTITY)
    assert len(ds) == 12 and ds.layout == "npy"
    assert [ds.read_raw(k)["meta"]["index"] for k in range(12)] == list(range(12))  # 2 before 10
    for k in (0, 11):
        raw = ds.read_raw(k)
        exp = expected[k]
        assert raw["image"].dtype == np.float32 and np.array_equal(raw["image"], exp["image"])
        assert np.array_equal(raw["seg"], exp["seg"]) and raw["seg"][0, 0] == 255
        assert raw["depth"].shape == (6, 8) and np.array_equal(raw["depth"], exp["depth"])
        np.testing.assert_allclose(raw["normal"], exp["normal"], atol=1e-6)
        assert raw["meta"]["size"] == (6, 8)
        sample = ds[k]
        assert torch.equal(sample["image"], torch.from_numpy(exp["image"]).permute(2, 0, 1))
        assert sample["seg"].dtype == torch.int64 and torch.equal(sample["seg"], torch.from_numpy(exp["seg"]))
        assert torch.equal(sample["depth"][0], torch.from_numpy(exp["depth"]))
        assert sample["normal"].shape == (3, 6, 8)


def test_npy_depth_hw_and_task_subset(tmp_path):
    expected = F.write_nyuv2_npy(tmp_path, "val", n=2, depth_hw1=False, tasks=("depth",))
    ds = NYUv2(tmp_path, "val", tasks=("depth",))
    sample = ds[1]
    assert set(sample) == {"image", "depth", "meta"}
    assert torch.equal(sample["depth"][0], torch.from_numpy(expected[1]["depth"]))
    with pytest.raises(ConfigError, match=r"data.tasks: task 'seg' .*label"):
        NYUv2(tmp_path, "val", tasks=("seg", "depth"))


def test_npy_corrupt_file(npy_root):
    root, expected = npy_root
    bad = root / "train" / "label" / "1.npy"
    bad.write_bytes(b"\x93NUMPY garbage")
    ds = NYUv2(root, "train")
    with pytest.raises(DataError, match="cannot read") as e:
        ds[1]
    assert e.value.path == str(bad) and e.value.field == "seg"
    for k in (0, 2):  # the other samples still read, unchanged
        assert torch.equal(ds[k]["seg"], torch.from_numpy(expected[k]["seg"])), k


def test_npy_missing_label_file(npy_root):
    root, _ = npy_root
    missing = root / "train" / "depth" / "2.npy"
    missing.unlink()
    with pytest.raises(DataError, match="file not found") as e:
        NYUv2(root, "train")[2]
    assert e.value.path == str(missing) and e.value.field == "depth"


@pytest.mark.parametrize("value, message", [(13.0, r"\[13\] out of range"), (-2.0, r"\[-2\] out of range"),
                                            (2.5, "non-integer")])
def test_npy_bad_label_values(npy_root, value, message):
    root, _ = npy_root
    path = root / "train" / "label" / "0.npy"
    label = np.load(path)
    label[3, 5] = value
    np.save(path, label)
    with pytest.raises(DataError, match=message) as e:
        NYUv2(root, "train")[0]
    assert e.value.path == str(path) and e.value.field == "seg"


def test_npy_wrong_shapes(npy_root):
    root, _ = npy_root
    depth = root / "train" / "depth" / "0.npy"
    np.save(depth, np.ones((8, 6), np.float32))  # transposed
    with pytest.raises(DataError, match=r"expected shape \(6, 8\)") as e:
        NYUv2(root, "train", tasks=("depth",))[0]
    assert e.value.path == str(depth)
    image = root / "train" / "image" / "1.npy"
    np.save(image, np.ones((3, 6, 8)))  # CHW
    with pytest.raises(DataError, match=r"\[H, W, 3\]") as e:
        NYUv2(root, "train", tasks=())[1]
    assert e.value.path == str(image) and e.value.field == "image"
    np.save(image, np.full((6, 8, 3), 255.0))  # not in [0, 1]
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        NYUv2(root, "train", tasks=())[1]


def test_skip_bad_returns_a_named_skip_and_collate_drops_it(npy_root):
    root, _ = npy_root
    (root / "train" / "normal" / "0.npy").write_bytes(b"not an array")
    ds = NYUv2(root, "train", skip_bad=True)
    assert isinstance(ds[0], SkippedSample) and ds[0].reason.startswith(str(root / "train" / "normal" / "0.npy"))
    batch = collate_samples([ds[i] for i in range(3)])
    assert batch["num_skipped"] == 1 and batch["image"].shape == (2, 3, 6, 8)


def test_eigen_crop():
    assert eigen_crop_box((480, 640)) == EIGEN_CROP == (45, 471, 41, 601)
    assert eigen_crop_box((288, 384)) == (27, 283, 25, 361)


def test_eigen_crop_masks_depth(tmp_path):
    h, w = 48, 64
    (tmp_path / "val" / "image").mkdir(parents=True)
    (tmp_path / "val" / "depth").mkdir(parents=True)
    np.save(tmp_path / "val" / "image" / "0.npy", np.zeros((h, w, 3), np.float32))
    depth = np.arange(1, h * w + 1, dtype=np.float32).reshape(h, w)
    np.save(tmp_path / "val" / "depth" / "0.npy", depth)
    raw = NYUv2(tmp_path, "val", tasks=("depth",), eigen_crop=True).read_raw(0)
    r0, r1, c0, c1 = eigen_crop_box((h, w))
    assert (r0, r1, c0, c1) == (4, 47, 4, 60) and raw["meta"]["eigen_crop"] == (4, 47, 4, 60)
    inside = np.zeros((h, w), bool)
    inside[r0:r1, c0:c1] = True
    assert np.array_equal(raw["depth"][inside], depth[inside]) and (raw["depth"][~inside] == 0).all()


def test_mat_round_trip(mat_root):
    root, written = mat_root
    ds = NYUv2(root, "train", **IDENTITY)
    assert ds.layout == "mat" and len(ds) == 3  # trainNdxs = 1, 3, 5
    for k, i in enumerate((0, 2, 4)):
        raw = ds.read_raw(k)
        assert raw["meta"]["index"] == i
        assert raw["image"].shape == (6, 8, 3) and np.array_equal(raw["image"], written["images"][i])
        assert raw["depth"].dtype == np.float32 and np.array_equal(raw["depth"], written["depths"][i])
        assert np.array_equal(raw["seg"], _expected_seg(written, i))
        assert (raw["seg"][written["raw_labels"][i] == 0] == 255).all()
        # PNG normals are quantised to 8 bits
        np.testing.assert_allclose(raw["normal"], written["normals"][i], atol=0.01)
        assert (raw["normal"][3, 2] == 0).all()
    val = NYUv2(root, "val", tasks=("depth",))
    assert len(val) == 2 and [val.read_raw(k)["meta"]["index"] for k in range(2)] == [1, 3]


def test_mat_npy_normals_and_pattern(tmp_path):
    written = F.write_nyuv2_mat(tmp_path, normals="npy", normals_dir="nrm")
    for i in range(5):  # rename to 1-based numbers
        (tmp_path / "nrm" / f"{i:04d}.npy").rename(tmp_path / "nrm" / f"n{i + 1}.npy")
    ds = NYUv2(tmp_path, "test", tasks=("normal",), normals_dir="nrm", normals_pattern="n{number}")
    np.testing.assert_allclose(ds.read_raw(1)["normal"], written["normals"][3], atol=1e-6)
    (tmp_path / "nrm" / "n2.npy").unlink()
    with pytest.raises(DataError, match="normal map of image index 1 not found") as e:
        ds[0]
    assert e.value.path == str(tmp_path / "nrm" / "n2.png")


def test_mat_files_are_the_official_formats(mat_root):
    root, written = mat_root
    header = (root / "nyu_depth_v2_labeled.mat").read_bytes()[:128]
    assert header.startswith(b"MATLAB 7.3 MAT-file") and header[-2:] == b"IM"
    # v7.3 goes through h5py, v5 through scipy; both give MATLAB's axis order
    assert _load_mat_field(root / "nyu_depth_v2_labeled.mat", "depths").shape == (6, 8, 5)
    assert _load_mat_field(root / "splits.mat", "trainNdxs").shape == (3, 1)
    assert np.array_equal(load_class_mapping40(root / "classMapping40.mat"), written["map40"])


def test_mat_missing_class_mapping_and_normals(mat_root, tmp_path):
    root, _ = mat_root
    (root / "classMapping40.mat").rename(tmp_path / "elsewhere.mat")
    with pytest.raises(ConfigError, match="data.kwargs.class_mapping40"):
        NYUv2(root, "train")
    ds = NYUv2(root, "train", class_mapping40=str(tmp_path / "elsewhere.mat"))
    assert ds[0]["seg"].shape == (6, 8)
    with pytest.raises(ConfigError, match="data.kwargs.normals_dir"):
        NYUv2(root, "train", tasks=("normal",), normals_dir="nowhere")


def test_mat_corrupt_and_out_of_range(tmp_path):
    import h5py

    written = F.write_nyuv2_mat(tmp_path, normals=None)
    mat = tmp_path / "nyu_depth_v2_labeled.mat"
    with h5py.File(mat, "r+") as f:
        labels = f["labels"][1]
        labels[4, 2] = 11  # the fixture has 10 raw classes; stored transposed: pixel (row 2, col 4)
        f["labels"][1] = labels
    ds = NYUv2(tmp_path, "val", tasks=("seg",))
    with pytest.raises(DataError, match=r"image index 1 .*\[11\] out of range") as e:
        ds[0]
    assert e.value.path == str(mat) and e.value.field == "labels"
    assert np.array_equal(ds.read_raw(1)["seg"], _expected_seg(written, 3))
    ds._h5file.close()
    mat.write_bytes(b"MATLAB 7.3 MAT-file" + b"\x00" * 600)
    with pytest.raises(DataError, match="cannot open as a MATLAB v7.3") as e:
        NYUv2(tmp_path, "val", tasks=("depth",))
    assert e.value.path == str(mat)
    (tmp_path / "classMapping40.mat").write_bytes(b"garbage")
    with pytest.raises(DataError) as e:
        load_class_mapping40(tmp_path / "classMapping40.mat")
    assert e.value.path == str(tmp_path / "classMapping40.mat") and e.value.field == "mapClass"


def test_mat_handle_is_opened_per_process(mat_root):
    root, written = mat_root
    ds = NYUv2(root, "train", tasks=("depth",))
    first = ds[0]
    assert ds._h5file is not None
    clone = pickle.loads(pickle.dumps(ds))  # a spawned worker's copy: no open handle travels
    assert clone._h5file is None and torch.equal(clone[0]["depth"], first["depth"])
    # a forked worker inherits the parent's open handle object and must open its own
    loader = DataLoader(ds, batch_size=3, num_workers=1, collate_fn=collate_samples)
    batch = next(iter(loader))
    assert torch.equal(batch["depth"][:, 0], torch.from_numpy(written["depths"][[0, 2, 4]]))


def test_from_config(npy_root):
    root, expected = npy_root
    data = DataConfig(dataset="nyuv2", root=str(root), num_classes=13, tasks=["seg", "depth"],
                      kwargs={"eigen_crop": True}, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    ds = NYUv2.from_config(data, "train", transform=None, seed=3)
    assert ds.tasks == ("seg", "depth") and not ds.eigen_crop and ds.seed == 3  # crop: evaluation only
    assert set(ds[0]) == {"image", "seg", "depth", "meta"}
    data.val_split = "train"
    data.train_split = "other"
    assert NYUv2.from_config(data, "train", transform=None, seed=0).eigen_crop
    data.kwargs = {"eigen_crop": True, "colour": 1}
    with pytest.raises(ConfigError, match="data.kwargs.colour"):
        NYUv2.from_config(data, "train", transform=None, seed=0)
    data.kwargs = {}
    data.num_classes = 40
    with pytest.raises(ConfigError, match="data.num_classes"):
        NYUv2.from_config(data, "train", transform=None, seed=0)


def test_build_dataset(npy_root):
    pytest.importorskip("mtvision.data.transforms")
    from mtvision.data import build_dataset

    root, expected = npy_root
    data = DataConfig(dataset="nyuv2", root=str(root), num_classes=13, size=(6, 8), train_split="train",
                      val_split="train", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    ds = build_dataset(data, "val")
    assert isinstance(ds, NYUv2) and len(ds) == 3
    sample = ds[2]
    assert torch.equal(sample["seg"], torch.from_numpy(expected[2]["seg"]))
    assert torch.equal(sample["depth"][0], torch.from_numpy(expected[2]["depth"]))
    data.root = str(root / "missing")
    with pytest.raises(ConfigError, match="data.root"):
        build_dataset(data, "train")
