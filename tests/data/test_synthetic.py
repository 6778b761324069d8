"""Tests of the procedural synthetic scenes and of collate_samples."""

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mtvision.data import SYNTHETIC_CLASSES, SyntheticScenes, collate_samples
from mtvision.data import synthetic_render as S
from mtvision.data.synthetic import backproject

SIZE = (48, 64)
GEOM_SIZE = (64, 80)


def _assert_samples_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def _cam_points(ds, index):
    """Camera-frame 3D points [H,W,3] of sample ``index`` from its (float32) depth and intrinsics."""
    sample = ds[index]
    m = sample["meta"]
    depth = sample["depth"][0].numpy()
    return sample, backproject(depth, m["fx"], m["fy"], m["cx"], m["cy"])


def test_classes_and_intrinsics():
    assert SYNTHETIC_CLASSES == ("floor", "wall", "ceiling", "box", "sphere", "cylinder")
    ds = SyntheticScenes(3, size=(30, 50))
    i = ds.intrinsics
    assert i["cx"] == 25.0 and i["cy"] == 15.0 and i["fx"] == i["fy"]
    # NYUv2-like horizontal field of view.
    assert math.degrees(2 * math.atan(25.0 / i["fx"])) == pytest.approx(63.4, abs=0.1)
    meta = ds[1]["meta"]
    assert meta["index"] == 1 and meta["seed"] == 0 and tuple(meta["size"]) == (30, 50)
    assert {k: meta[k] for k in ("fx", "fy", "cx", "cy")} == i


def test_determinism():
    a, b = SyntheticScenes(10, size=SIZE, seed=3), SyntheticScenes(10, size=SIZE, seed=3)
    s5 = a[5]
    _assert_samples_equal(s5, a[5])
    _assert_samples_equal(s5, b[5])  # a fresh instance, other access order
    assert not torch.equal(s5["image"], a[6]["image"])
    assert not torch.equal(s5["depth"], a[6]["depth"])
    assert not torch.equal(s5["depth"], SyntheticScenes(10, size=SIZE, seed=4)[5]["depth"])
    _assert_samples_equal(a[-1], a[9])
    with pytest.raises(IndexError):
        a[10]


def test_dataloader_workers_match_direct_access():
    ds = SyntheticScenes(6, size=(24, 32), seed=1)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_samples)
    batches = list(loader)
    for b, batch in enumerate(batches):
        for j in range(3):
            s = ds[3 * b + j]
            for key in ("image", "seg", "depth", "normal"):
                assert torch.equal(batch[key][j], s[key]), key
            assert torch.equal(batch["boxes"][j], s["boxes"])
            assert torch.equal(batch["labels"][j], s["labels"])
            assert batch["meta"][j]["index"] == 3 * b + j


@pytest.mark.parametrize("index", range(6))
def test_shapes_dtypes_ranges(index):
    h, w = SIZE
    ds = SyntheticScenes(6, size=SIZE, seed=0)
    s = ds[index]
    assert set(s) == {"image", "seg", "depth", "normal", "boxes", "labels", "meta"}
    assert s["image"].shape == (3, h, w) and s["image"].dtype == torch.float32
    assert s["seg"].shape == (h, w) and s["seg"].dtype == torch.int64
    assert s["depth"].shape == (1, h, w) and s["depth"].dtype == torch.float32
    assert s["normal"].shape == (3, h, w) and s["normal"].dtype == torch.float32
    assert s["boxes"].dtype == torch.float32 and s["labels"].dtype == torch.int64
    assert s["boxes"].shape == (len(s["labels"]), 4)

    rgb = s["image"] * torch.tensor(ds.std).view(3, 1, 1) + torch.tensor(ds.mean).view(3, 1, 1)
    assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5
    assert rgb.std() > 0.02  # not a blank image
    assert s["seg"].min() >= 0 and s["seg"].max() < len(SYNTHETIC_CLASSES)
    # A closed room: every ray hits something at a positive, finite, room-sized depth.
    assert torch.isfinite(s["depth"]).all() and s["depth"].min() > 0 and s["depth"].max() < 15
    assert torch.allclose(s["normal"].norm(dim=0), torch.ones(h, w), atol=1e-5)
    # Normals face the camera: negative dot product with the pixel's viewing ray.
    rays = torch.from_numpy(ds._rays).float()
    assert ((s["normal"] * rays).sum(0) < 0).all()

    boxes = s["boxes"]
    if len(boxes):
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert set(s["labels"].tolist()) <= {3, 4, 5}


def test_boxes_match_instance_pixels():
    ds = SyntheticScenes(8, size=SIZE, seed=2, min_box_pixels=10)
    n_boxes = 0
    for i in range(8):
        r = ds.render(i)
        inst = r["instance"]
        counts = np.bincount(inst.ravel() + 1, minlength=len(r["scene"]["objects"]) + 1)[1:]
        assert r["box_objects"] == [k for k, c in enumerate(counts) if c >= 10]
        for box, label, k in zip(r["boxes"], r["labels"], r["box_objects"]):
            ys, xs = np.nonzero(inst == k)
            np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            assert label == r["scene"]["objects"][k]["class_id"]
            assert np.all(r["seg"][inst == k] == label)
            n_boxes += 1
        # The dataset's sample carries exactly these boxes.
        s = ds[i]
        np.testing.assert_array_equal(s["boxes"].numpy(), r["boxes"])
        np.testing.assert_array_equal(s["labels"].numpy(), r["labels"])
    assert n_boxes >= 8


def test_room_planes_exact():
    """Back-projected floor/wall/ceiling pixels lie on their plane (camera frame), with its normal."""
    ds = SyntheticScenes(5, size=GEOM_SIZE, seed=0)
    for i in range(5):
        sample, pts = _cam_points(ds, i)
        r = ds.render(i)
        scene = r["scene"]
        normal = sample["normal"].permute(1, 2, 0).numpy()
        cam = scene["camera"]
        r_wc = cam["rotation"]
        np.testing.assert_allclose(r_wc.T @ r_wc, np.eye(3), atol=1e-12)
        assert np.linalg.det(r_wc) == pytest.approx(1.0)
        floor = scene["planes"][0]
        assert floor["name"] == "floor"
        # The camera-frame floor offset is the camera's height above the floor.
        assert floor["offset_cam"] == pytest.approx(cam["position"][2])
        checked_floor = False
        for s_id, plane in enumerate(scene["planes"]):
            mask = r["surface"] == s_id
            if not mask.any():
                continue
            assert np.all(sample["seg"].numpy()[mask] == plane["class_id"])
            x = pts[mask]
            residual = x @ plane["normal_cam"] + plane["offset_cam"]
            assert np.all(np.abs(residual) <= 1e-5 * np.linalg.norm(x, axis=1)), plane["name"]
            np.testing.assert_allclose(normal[mask], np.broadcast_to(plane["normal_cam"], x.shape),
                                       atol=1e-6)
            checked_floor |= plane["name"] == "floor"
        assert checked_floor
        # seg == floor is exactly the floor surface.
        np.testing.assert_array_equal(sample["seg"].numpy() == 0, r["surface"] == 0)


def _objects_in_camera(scene):
    cam = scene["camera"]
    for k, obj in enumerate(scene["objects"]):
        centre = cam["rotation"].T @ (obj["center"] - cam["position"])
        rot = cam["rotation"].T @ S._rot_z(obj["yaw"])  # object-local axes in the camera frame
        yield k, obj, centre, rot


def test_object_surfaces_exact():
    """Sphere pixels: |X - c| = r and normal = (X - c) / r. Box and cylinder pixels lie on their
    surface with the face's outward normal."""
    ds = SyntheticScenes(12, size=GEOM_SIZE, seed=5)
    seen = set()
    for i in range(12):
        sample, pts = _cam_points(ds, i)
        r = ds.render(i)
        normal = sample["normal"].permute(1, 2, 0).numpy().astype(np.float64)
        for k, obj, centre, rot in _objects_in_camera(r["scene"]):
            mask = r["instance"] == k
            if not mask.any():
                continue
            seen.add(obj["kind"])
            x, n = pts[mask], normal[mask]
            scale = np.linalg.norm(x, axis=1)
            if obj["kind"] == "sphere":
                rad = obj["radius"]
                dist = np.linalg.norm(x - centre, axis=1)
                assert np.all(np.abs(dist - rad) <= 1e-5 * scale)
                np.testing.assert_allclose(n, (x - centre) / rad, atol=1e-4)
                continue
            local = (x - centre) @ rot  # object frame (z up)
            n_local = n @ rot
            if obj["kind"] == "box":
                half = obj["half_extents"]
                ratio = np.abs(local) / half
                assert np.all(ratio <= 1 + 1e-4)
                face = np.argmax(ratio, axis=1)
                assert np.all(np.abs(ratio.max(axis=1) - 1) <= 1e-4)
                expected = np.zeros_like(local)
                rows = np.arange(len(local))
                expected[rows, face] = np.sign(local[rows, face])
                np.testing.assert_allclose(n_local, expected, atol=1e-5)
            else:
                rad, hh = obj["radius"], obj["height"] / 2
                rho = np.hypot(local[:, 0], local[:, 1])
                on_side = np.abs(rho - rad) <= 1e-4 * scale
                on_cap = np.abs(local[:, 2] - hh) <= 1e-4 * scale
                assert np.all(on_side | on_cap)
                assert np.all(rho <= rad + 1e-4) and np.all(local[:, 2] <= hh + 1e-4)
                side = on_side & ~on_cap
                np.testing.assert_allclose(n_local[side, :2], local[side, :2] / rad, atol=1e-4)
                np.testing.assert_allclose(n_local[side, 2], 0, atol=1e-5)
                cap = n_local[on_cap & ~on_side]
                np.testing.assert_allclose(cap, np.broadcast_to([0.0, 0.0, 1.0], cap.shape), atol=1e-5)
    assert seen == {"box", "sphere", "cylinder"}


def test_nearest_hit_matches_brute_force(monkeypatch):
    """Screen-space culling of objects and shadow culling change nothing: compare with testing every
    primitive (and every shadow ray) on every pixel."""
    ds = SyntheticScenes(10, size=(40, 52), seed=7)
    for i in range(10):
        scene = ds.scene(i)
        fast = S.render_scene(scene, ds._rays)
        with monkeypatch.context() as m:
            m.setattr(S, "_screen_rect", lambda obj, cam, h, w: (0, h, 0, w))
            for obj in scene["objects"]:
                obj["_bound"] = 1e9  # light inside every bounding sphere: no shadow culling
            slow = S.render_scene(scene, ds._rays)
        for key in ("surface", "depth", "rgb", "normal"):
            np.testing.assert_array_equal(fast[key], slow[key], err_msg=key)


def test_every_class_appears():
    ds = SyntheticScenes(10, size=SIZE, seed=0)
    counts = sum(np.bincount(ds[i]["seg"].numpy().ravel(), minlength=6) for i in range(10))
    assert np.all(counts > 0), counts
    labels = torch.cat([ds[i]["labels"] for i in range(10)])
    assert set(labels.tolist()) == {3, 4, 5}


def test_colour_does_not_reveal_class():
    """Surfaces of every class draw colours from the same distribution: mean colours of the classes
    are close, while one class's colour varies strongly from scene to scene."""
    ds = SyntheticScenes(40, size=(32, 40), seed=0, noise_std=0.0)
    per_class = {c: [] for c in range(6)}
    for i in range(40):
        r = ds.render(i)
        for c in range(6):
            m = r["seg"] == c
            if m.sum() >= 10:
                per_class[c].append(r["rgb"][m].mean(axis=0))
    means = np.array([np.mean(per_class[c], axis=0) for c in range(6)])
    spread = np.array([np.std(per_class[c], axis=0).mean() for c in range(6)])
    assert np.abs(means[:, None] - means[None]).max() < 0.2
    assert spread.min() > 0.08


def test_noise_and_transform():
    clean = SyntheticScenes(2, size=SIZE, noise_std=0.0)[0]
    noisy = SyntheticScenes(2, size=SIZE, noise_std=0.05)[0]
    diff = (noisy["image"] - clean["image"]) * torch.tensor(S.IMAGENET_STD).view(3, 1, 1)
    assert 0.02 < diff.std() < 0.06
    assert torch.equal(noisy["depth"], clean["depth"])

    seen = {}

    def transform(sample):
        seen.update(sample)
        return {**sample, "depth": sample["depth"] * 2}

    base = SyntheticScenes(2, size=SIZE)[1]
    out = SyntheticScenes(2, size=SIZE, transform=transform)[1]
    assert torch.equal(seen["image"], base["image"])  # transform sees the finished sample
    assert torch.equal(out["depth"], base["depth"] * 2)



def test_mean_std_normalisation():
    a = SyntheticScenes(1, size=SIZE, mean=(0, 0, 0), std=(1, 1, 1))[0]["image"]
    b = SyntheticScenes(1, size=SIZE)[0]["image"]
    mean = torch.tensor(S.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(S.IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(b, (a - mean) / std)
    assert a.min() >= 0 and a.max() <= 1


@pytest.mark.parametrize("kwargs", [dict(num_samples=-1), dict(size=(0, 4)), dict(max_objects=0),
                                    dict(std=(1, 0, 1))])
def test_bad_arguments(kwargs):
    args = dict(num_samples=2, size=SIZE) | kwargs
    with pytest.raises(ValueError, match="SyntheticScenes"):
        SyntheticScenes(**args)


def test_collate_samples():
    ds = SyntheticScenes(3, size=SIZE)
    batch = collate_samples([ds[0], ds[1], ds[2]])
    h, w = SIZE
    assert batch["image"].shape == (3, 3, h, w)
    assert batch["seg"].shape == (3, h, w) and batch["seg"].dtype == torch.int64
    assert batch["depth"].shape == (3, 1, h, w)
    assert batch["normal"].shape == (3, 3, h, w)
    assert isinstance(batch["boxes"], list) and len(batch["boxes"]) == 3
    assert [len(b) for b in batch["boxes"]] == [len(ds[i]["labels"]) for i in range(3)]
    assert [m["index"] for m in batch["meta"]] == [0, 1, 2]
    assert torch.equal(batch["depth"][1], ds[1]["depth"])

    # Only the keys present are collated (e.g. a dataset without depth or boxes).
    partial = [{k: v for k, v in ds[i].items() if k in ("image", "seg", "meta")} for i in range(2)]
    out = collate_samples(partial)
    assert set(out) == {"image", "seg", "meta"} and out["image"].shape == (2, 3, h, w)

    with pytest.raises(ValueError, match="keys"):
        collate_samples([ds[0], partial[0]])
    with pytest.raises(ValueError, match="empty"):
        collate_samples([])
    with pytest.raises(ValueError, match="image"):
        collate_samples([ds[0], SyntheticScenes(1, size=(24, 32))[0]])
