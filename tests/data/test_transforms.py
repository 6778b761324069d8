"""mtvision.data.transforms: every geometry rule (resize, random scale, crop and pad, flip, colour jitter;
how each moves seg, depth, normals and boxes) on constructed raw samples."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest

from mtvision.config import AugmentConfig, DataConfig
from mtvision.data.sample import RawDataset
from mtvision.data.transforms import (MultiTaskTransform, _NearestMap, boxes_to_original,
                                      build_transform)

H, W = 48, 64


def rng(seed=0):
    return np.random.default_rng(seed)


def unit_normals(g, shape):
    n = g.normal(size=(*shape, 3)).astype(np.float32)
    n[..., 2] = np.abs(n[..., 2]) + 0.1
    return (n / np.linalg.norm(n, axis=-1, keepdims=True)).astype(np.float32)


def make_raw(h=H, w=W, seed=0, holes=True, seg_dtype=np.int64):
    """A raw sample with random labels; ``holes``: the same pixels are ignore/invalid in seg, depth and
    normal (so the three invalid masks must stay identical through any transform)."""
    g = rng(seed)
    seg = g.choice(np.array([0, 3, 7]), size=(h, w)).astype(seg_dtype)
    depth = g.uniform(0.5, 10.0, size=(h, w)).astype(np.float32)
    normal = unit_normals(g, (h, w))
    if holes:
        hole = g.random((h, w)) < 0.2
        seg[hole], depth[hole], normal[hole] = 255, 0.0, 0.0
    return {
        "image": g.integers(0, 256, size=(h, w, 3), dtype=np.uint8),
        "seg": seg,
        "depth": depth,
        "normal": normal,
        "boxes": np.array([[2.0, 3.0, 20.0, 30.0], [40.0, 10.0, 60.0, 44.0]], dtype=np.float32),
        "labels": np.array([4, 9], dtype=np.int64),
        "meta": {"source": "constructed.png", "size": (h, w)},
    }


def rect_raw(h, w, box, cls=5):
    """Black image / class 1 background with a white / class ``cls`` rectangle covering ``box`` (xyxy
    pixel edges), depth 2 m, normals facing the camera; the box is the rectangle's box."""
    x1, y1, x2, y2 = box
    image = np.zeros((h, w, 3), np.uint8)
    image[y1:y2, x1:x2] = 255
    seg = np.ones((h, w), np.int64)
    seg[y1:y2, x1:x2] = cls
    normal = np.zeros((h, w, 3), np.float32)
    normal[..., 2] = -1.0
    return {"image": image, "seg": seg, "depth": np.full((h, w), 2.0, np.float32), "normal": normal,
            "boxes": np.array([box], np.float32), "labels": np.array([cls], np.int64), "meta": {}}


def pixel_box(mask):
    """xyxy pixel-edge box of the True pixels."""
    rows, cols = np.nonzero(mask)
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], np.float64)


def valid_region(meta, crop_hw):
    """Boolean [H, W] of the crop pixels that show the (scaled) image, not the padding."""
    t = meta["transform"]
    hs, ws = t["scaled_size"]
    x0, y0 = t["crop"][:2]
    ch, cw = crop_hw
    rows = (np.arange(ch) + y0 >= 0) & (np.arange(ch) + y0 < hs)
    cols = (np.arange(cw) + x0 >= 0) & (np.arange(cw) + x0 < ws)
    return rows[:, None] & cols[None, :]


# ---------------------------------------------------------------------------------------------------
# Flip


def test_hflip_mirrors_everything_and_negates_normal_x():
    raw = make_raw()
    out = MultiTaskTransform((H, W), hflip=1.0)(raw, rng())
    assert out["meta"]["transform"]["hflip"] is True
    np.testing.assert_array_equal(out["image"], raw["image"][:, ::-1])
    np.testing.assert_array_equal(out["seg"], raw["seg"][:, ::-1])
    np.testing.assert_array_equal(out["depth"], raw["depth"][:, ::-1])
    expected = raw["normal"][:, ::-1].copy()
    expected[..., 0] *= -1
    np.testing.assert_array_equal(out["normal"], expected)
    # invalid normals stay +0.0 (not -0.0) and valid ones keep unit length
    invalid = raw["seg"][:, ::-1] == 255
    assert not np.signbit(out["normal"][invalid]).any()
    np.testing.assert_allclose(np.linalg.norm(out["normal"][~invalid], axis=-1), 1.0, atol=1e-6)
    b = raw["boxes"]
    np.testing.assert_array_equal(out["boxes"], np.stack([W - b[:, 2], b[:, 1], W - b[:, 0], b[:, 3]], 1))
    np.testing.assert_array_equal(out["labels"], raw["labels"])


def test_no_flip_with_probability_zero_and_both_with_half():
    raw = make_raw()
    t0 = MultiTaskTransform((H, W), hflip=0.0)
    assert not any(t0(raw, rng(s))["meta"]["transform"]["hflip"] for s in range(20))
    t = MultiTaskTransform((H, W), hflip=0.5)
    flips = [t(raw, rng(s))["meta"]["transform"]["hflip"] for s in range(40)]
    assert 5 < sum(flips) < 35


def test_flip_applies_to_the_normal_x_component_only_and_a_double_flip_is_identity():
    raw = make_raw()
    t = MultiTaskTransform((H, W), hflip=1.0)
    twice = t(t(raw, rng()), rng())
    for k in ("image", "seg", "depth", "normal", "boxes", "labels"):
        np.testing.assert_array_equal(twice[k], raw[k])
        assert not np.signbit(twice["normal"][raw["seg"] == 255]).any()


# ---------------------------------------------------------------------------------------------------
# Scale


@pytest.mark.parametrize("s", [0.5, 0.73, 1.5, 2.0])
def test_scale_divides_metric_depth_by_s(s):
    raw = make_raw(holes=False)
    raw["depth"][:] = 4.0
    t = MultiTaskTransform((H, W), scale_range=(s, s))
    out = t(raw, rng(1))
    meta = out["meta"]["transform"]
    assert meta["scale"] == s
    assert meta["scaled_size"] == (round(H * s), round(W * s))
    inside = valid_region(out["meta"], (H, W))
    np.testing.assert_allclose(out["depth"][inside], np.float32(4.0) / np.float32(s), rtol=1e-6)
    assert (out["depth"][~inside] == 0).all()  # padding (scale < 1) is invalid depth
    assert out["depth"].dtype == np.float32


def test_random_scale_depth_matches_the_recorded_scale():
    raw = make_raw(holes=False)
    raw["depth"][:] = 3.0
    t = MultiTaskTransform((H, W), scale_range=(0.5, 2.0))
    scales = []
    for seed in range(10):
        out = t(raw, rng(seed))
        s = out["meta"]["transform"]["scale"]
        scales.append(s)
        assert 0.5 <= s <= 2.0
        inside = valid_region(out["meta"], (H, W))
        np.testing.assert_allclose(out["depth"][inside], np.float32(3.0) / np.float32(s), rtol=1e-6)
    assert len(set(scales)) == 10


@pytest.mark.parametrize("s", [0.61, 1.0, 1.37, 1.9])
def test_scaled_seg_stays_in_its_label_set(s):
    raw = make_raw(seed=3)
    out = MultiTaskTransform((H, W), scale_range=(s, s))(raw, rng(2))
    assert set(np.unique(out["seg"]).tolist()) <= {0, 3, 7, 255}
    assert out["seg"].dtype == np.int64


def test_normals_are_copied_not_interpolated_under_scale():
    raw = make_raw(seed=4)
    out = MultiTaskTransform((H, W), scale_range=(1.3, 1.3))(raw, rng())
    n = out["normal"].reshape(-1, 3)
    src = {tuple(v) for v in raw["normal"].reshape(-1, 3).tolist()}
    assert all(tuple(v) in src for v in n.tolist())


# ---------------------------------------------------------------------------------------------------
# Crop and padding


def test_crop_padding_values():
    raw = make_raw(holes=False)
    t = MultiTaskTransform((H, W), scale_range=(0.5, 0.5))  # 24x32 image inside a 48x64 crop
    for seed in range(5):
        out = t(raw, rng(seed))
        inside = valid_region(out["meta"], (H, W))
        assert inside.sum() == 24 * 32
        assert (out["image"][~inside] == 0).all()
        assert (out["seg"][~inside] == 255).all()
        assert (out["depth"][~inside] == 0).all()
        assert (out["normal"][~inside] == 0).all() and not np.signbit(out["normal"][~inside]).any()
        # the image part holds no padding values
        assert (out["seg"][inside] != 255).all() and (out["depth"][inside] > 0).all()
        np.testing.assert_allclose(np.linalg.norm(out["normal"][inside], axis=-1), 1.0, atol=1e-6)


def test_crop_larger_than_size_pads_and_smaller_crops():
    raw = make_raw(holes=False)
    out = MultiTaskTransform((H, W), crop=(60, 80))(raw, rng(3))
    assert out["image"].shape == (60, 80, 3) and out["seg"].shape == (60, 80)
    assert (out["seg"] == 255).sum() == 60 * 80 - H * W
    out = MultiTaskTransform((H, W), crop=(32, 40))(raw, rng(3))
    x0, y0, x1, y1 = out["meta"]["transform"]["crop"]
    assert (x1 - x0, y1 - y0) == (40, 32)
    np.testing.assert_array_equal(out["seg"], raw["seg"][y0:y1, x0:x1])
    np.testing.assert_array_equal(out["image"], raw["image"][y0:y1, x0:x1])
    np.testing.assert_array_equal(out["depth"], raw["depth"][y0:y1, x0:x1])


def test_boxes_are_shifted_clipped_and_dropped_with_their_labels():
    raw = make_raw()
    raw["boxes"] = np.array([[0, 0, 10, 10], [30, 20, 50, 40], [62, 46, 64, 48]], np.float32)
    raw["labels"] = np.array([1, 2, 3], np.int64)
    t = MultiTaskTransform((H, W), crop=(24, 32))
    for seed in range(20):
        out = t(raw, rng(seed))
        x0, y0 = out["meta"]["transform"]["crop"][:2]
        b = raw["boxes"].astype(np.float64) - [x0, y0, x0, y0]
        b[:, 0::2] = b[:, 0::2].clip(0, 32)
        b[:, 1::2] = b[:, 1::2].clip(0, 24)
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        np.testing.assert_allclose(out["boxes"], b[keep])
        np.testing.assert_array_equal(out["labels"], raw["labels"][keep])
        assert out["boxes"].dtype == np.float32 and out["labels"].dtype == np.int64
    # a crop that misses every box leaves an empty [0, 4] array
    raw["boxes"] = np.array([[0, 0, 4, 4]], np.float32)  # [0, 0, 8, 8] after the 2x scale
    raw["labels"] = np.array([1], np.int64)
    t = MultiTaskTransform((H, W), scale_range=(2.0, 2.0))
    outs = [t(raw, rng(seed)) for seed in range(10)]
    missed = [o for o in outs if max(o["meta"]["transform"]["crop"][:2]) >= 8]
    assert missed
    for o in missed:
        assert o["boxes"].shape == (0, 4) and o["labels"].shape == (0,)


def test_boxes_are_clipped_to_the_image_not_the_padding():
    raw = rect_raw(H, W, (0, 0, W, H))  # a box covering the whole image
    out = MultiTaskTransform((H, W), scale_range=(0.5, 0.5))(raw, rng(7))
    np.testing.assert_allclose(out["boxes"][0], pixel_box(valid_region(out["meta"], (H, W))))


# ---------------------------------------------------------------------------------------------------
# Composition


TRAIN = dict(hflip=0.5, scale_range=(0.5, 2.0), crop=(40, 56), color_jitter=0.4)


@pytest.mark.parametrize("seg_dtype", [np.int64, np.uint8, np.int32])
def test_full_pipeline_keeps_invalid_pixels_invalid(seg_dtype):
    """seg/depth/normal share their holes in the input; after any augmentation (scale, crop with padding,
    flip) the three invalid masks still coincide, no value is interpolated, normals are unit or 0."""
    raw = make_raw(h=60, w=80, seed=5, seg_dtype=seg_dtype)
    t = MultiTaskTransform((H, W), **TRAIN)  # also resizes 60x80 -> 48x64 first
    depths = set(np.unique(raw["depth"]).tolist())
    for seed in range(12):
        out = t(raw, rng(seed))
        s = out["meta"]["transform"]["scale"]
        assert out["seg"].dtype == seg_dtype
        invalid = out["seg"] == 255
        np.testing.assert_array_equal(out["depth"] == 0, invalid)
        np.testing.assert_array_equal((out["normal"] == 0).all(-1), invalid)
        assert not np.signbit(out["normal"][invalid]).any()
        assert set(np.unique(out["seg"]).tolist()) <= {0, 3, 7, 255}
        np.testing.assert_allclose(np.linalg.norm(out["normal"][~invalid], axis=-1), 1.0, atol=1e-6)
        # every valid depth is an input depth divided by s (never a blend of neighbours or of 0)
        back = np.unique(out["depth"][~invalid]) * np.float32(s)
        src = np.array(sorted(depths))
        nearest = src[np.clip(np.searchsorted(src, back), 0, len(src) - 1)]
        nearest_lo = src[np.clip(np.searchsorted(src, back) - 1, 0, len(src) - 1)]
        err = np.minimum(np.abs(nearest - back), np.abs(nearest_lo - back))
        assert (err <= 1e-5 * back).all()


def test_boxes_image_and_seg_stay_aligned_through_the_full_pipeline():
    """A white rectangle drawn in the image, its class in seg and its box: after resize, scale, crop and
    flip the three still describe the same rectangle (within a pixel)."""
    box = (6, 9, 30, 27)
    raw = rect_raw(72, 96, box)  # resized to 48x64 first (x 2/3)
    t = MultiTaskTransform((H, W), hflip=0.5, scale_range=(0.6, 1.8), crop=(40, 56))
    seen_flip = seen_pad = seen_drop = seen_clip = 0
    for seed in range(80):
        out = t(raw, rng(seed))
        meta = out["meta"]["transform"]
        seen_flip += meta["hflip"]
        seen_pad += not valid_region(out["meta"], (40, 56)).all()
        rect = out["seg"] == 5
        if not rect.any():
            # no rectangle pixel is visible: the box is gone or thinner than a pixel
            assert len(out["boxes"]) == 0 or (np.diff(out["boxes"][0].reshape(2, 2), axis=0) < 1).any()
            seen_drop += len(out["boxes"]) == 0
            continue
        assert out["labels"].tolist() == [5]
        np.testing.assert_allclose(out["boxes"][0], pixel_box(rect), atol=1.0)
        seen_clip += bool(rect[0].any() or rect[:, 0].any() or rect[:, -1].any())
        bright = out["image"][..., 0] > 127
        np.testing.assert_allclose(pixel_box(bright), pixel_box(rect), atol=1.0)
        # label pixels and bright image pixels agree except along the rectangle's border
        assert (bright != rect).sum() <= 2 * (rect.shape[0] + rect.shape[1])
    assert seen_flip and seen_pad and seen_drop and seen_clip


def test_colour_jitter_changes_the_image_only():
    raw = make_raw()
    plain = MultiTaskTransform((H, W), hflip=0.5, scale_range=(0.8, 1.2))
    jitter = MultiTaskTransform((H, W), hflip=0.5, scale_range=(0.8, 1.2), color_jitter=0.5)
    for seed in range(5):
        a, b = plain(raw, rng(seed)), jitter(raw, rng(seed))
        for k in ("seg", "depth", "normal", "boxes", "labels"):
            np.testing.assert_array_equal(a[k], b[k])
        assert b["image"].dtype == np.uint8 and b["image"].shape == a["image"].shape
        assert not np.array_equal(a["image"], b["image"])
        c = b["meta"]["transform"]["color_jitter"]
        assert sorted(c["order"]) == ["brightness", "contrast", "saturation"]
        assert all(0.5 <= c[k] <= 1.5 for k in ("brightness", "contrast", "saturation"))


def test_float_image_stays_float_in_unit_range():
    raw = make_raw()
    raw["image"] = raw["image"].astype(np.float64) / 255.0
    out = MultiTaskTransform((H, W), **TRAIN)(raw, rng(1))
    assert out["image"].dtype == np.float32
    assert out["image"].min() >= 0.0 and out["image"].max() <= 1.0


# ---------------------------------------------------------------------------------------------------
# Resize to size / eval transform


def test_eval_transform_resizes_only_and_keeps_depth_values():
    data = DataConfig(size=(H, W), augment=AugmentConfig(hflip=1.0, scale_range=(0.5, 2.0), color_jitter=0.5))
    t = build_transform(data, train=False)
    assert (t.hflip, t.scale_range, t.crop, t.color_jitter) == (0.0, (1.0, 1.0), (H, W), 0.0)
    raw = make_raw(h=96, w=128, seed=6)
    out = t(raw, rng(0))
    assert out["image"].shape == (H, W, 3) and out["image"].dtype == np.uint8
    assert out["seg"].shape == (H, W) and out["depth"].shape == (H, W) and out["normal"].shape == (H, W, 3)
    assert set(np.unique(out["depth"]).tolist()) <= set(np.unique(raw["depth"]).tolist())  # not a zoom
    assert set(np.unique(out["seg"]).tolist()) <= {0, 3, 7, 255}
    invalid = out["seg"] == 255
    np.testing.assert_array_equal(out["depth"] == 0, invalid)
    np.testing.assert_allclose(np.linalg.norm(out["normal"][~invalid], axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(out["boxes"], raw["boxes"] * 0.5)
    # an exact 2x shrink samples the source pixels (2i + 1, 2j + 1) (pixel-centre nearest neighbour)
    np.testing.assert_array_equal(out["seg"], raw["seg"][1::2, 1::2])
    np.testing.assert_array_equal(out["depth"], raw["depth"][1::2, 1::2])
    meta = out["meta"]["transform"]
    assert meta["scale"] == 1.0 and meta["hflip"] is False and meta["crop"] == (0, 0, W, H)
    assert meta["input_size"] == (96, 128)


def test_eval_transform_at_size_is_the_identity():
    raw = make_raw()
    out = build_transform(DataConfig(size=(H, W)), train=False)(raw, rng(0))
    for k in ("image", "seg", "depth", "normal", "boxes", "labels"):
        np.testing.assert_array_equal(out[k], raw[k])
        assert out[k].dtype == raw[k].dtype
    assert out["meta"]["source"] == "constructed.png"


def test_resize_shrink_uses_area_and_enlarge_bilinear():
    raw = make_raw(h=H, w=W)
    raw["image"][:] = 0
    raw["image"][:, ::2] = 200  # 1-pixel stripes: area averages them, nearest/bilinear at 0.5 would not
    out = MultiTaskTransform((H // 2, W // 2))(raw, rng())
    assert (out["image"] == 100).all()
    big = MultiTaskTransform((H * 2, W * 2))(make_raw(), rng())
    assert big["image"].shape == (H * 2, W * 2, 3)


def test_train_transform_from_config():
    data = DataConfig(size=(H, W), augment=AugmentConfig(hflip=0.5, scale_range=(0.75, 1.5), crop=(32, 48),
                                                         color_jitter=0.2))
    t = build_transform(data, train=True)
    assert (t.size, t.hflip, t.scale_range, t.crop, t.color_jitter) == \
        ((H, W), 0.5, (0.75, 1.5), (32, 48), 0.2)
    out = t(make_raw(), rng(0))
    assert out["image"].shape == (32, 48, 3) and out["seg"].shape == (32, 48)
    assert build_transform(DataConfig(size=(H, W)), train=True).crop == (H, W)


# ---------------------------------------------------------------------------------------------------
# Determinism, dtypes, robustness


def test_same_seed_same_output_different_seed_different_output():
    raw = make_raw()
    t = MultiTaskTransform((H, W), **TRAIN)
    a, b, c = t(raw, rng(42)), t(raw, rng(42)), t(raw, rng(43))
    for k in ("image", "seg", "depth", "normal", "boxes", "labels"):
        np.testing.assert_array_equal(a[k], b[k])
        assert a[k].dtype == b[k].dtype
    assert a["meta"] == b["meta"]
    assert a["meta"]["transform"] != c["meta"]["transform"]
    # global random state plays no part
    np.random.seed(0)
    d = t(raw, rng(42))
    np.random.seed(1)
    np.testing.assert_array_equal(d["image"], t(raw, rng(42))["image"])


def test_inputs_are_not_modified():
    raw = make_raw()
    for a in raw.values():
        if isinstance(a, np.ndarray):
            a.flags.writeable = False
    before = copy.deepcopy(raw)
    MultiTaskTransform((H, W), hflip=1.0, scale_range=(0.7, 1.4), color_jitter=0.3)(raw, rng())
    for k in ("image", "seg", "depth", "normal", "boxes", "labels"):
        np.testing.assert_array_equal(raw[k], before[k])
    assert raw["meta"] == before["meta"]


def test_subsets_of_keys_and_other_keys_pass_through():
    g = rng()
    raw = {"image": g.integers(0, 256, (H, W, 3), dtype=np.uint8), "depth": np.ones((H, W), np.float32),
           "extra": "kept"}
    out = MultiTaskTransform((H, W), **TRAIN)(raw, rng(1))
    assert set(out) == {"image", "depth", "extra", "meta"} and out["extra"] == "kept"
    boxes_only = {"image": raw["image"], "boxes": np.zeros((0, 4), np.float32),
                  "labels": np.zeros(0, np.int64)}
    out = MultiTaskTransform((H, W), **TRAIN)(boxes_only, rng(1))
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)


@pytest.mark.parametrize("dtype", [np.int64, np.uint64, np.int32, np.uint8, np.int8, np.int16, np.float32,
                                   np.float64, np.float16, np.bool_])
@pytest.mark.parametrize("channels", [(), (1,), (2,), (3,), (5,)])
@pytest.mark.parametrize("indices", ["scaled", "crop", "flipped crop", "full"])
def test_nearest_map_copies_exactly_for_every_dtype(dtype, channels, indices):
    """cv2.remap (int64 as int32 pairs), numpy indexing and the plain-slice path all give the reference."""
    g = rng(1)
    hi = 2**40 if np.dtype(dtype).itemsize == 8 and np.issubdtype(dtype, np.integer) else 100
    a = g.integers(0, hi, size=(7, 9, *channels)).astype(dtype)
    if dtype is np.int64:
        a[0, 0] = -(2**40)  # both int32 halves matter
    rows, cols = {
        "scaled": ((1, 5, np.array([0, 2, 4, 6])), (2, 8, np.array([8, 7, 3, 3, 1, 0]))),
        "crop": ((1, 5, np.array([3, 4, 5, 6])), (2, 8, np.array([1, 2, 3, 4, 5, 6]))),
        "flipped crop": ((0, 6, np.arange(6)), (2, 10, np.arange(8, 0, -1))),
        "full": ((0, 6, np.arange(6)), (0, 10, np.arange(9, -1, -1) % 9)),
    }[indices]
    fill = 1 if dtype is np.bool_ else 5
    out = _NearestMap((6, 10), rows, cols)(a, fill, dtype)
    ref = np.full((6, 10, *channels), fill, dtype)
    ref[rows[0]:rows[1], cols[0]:cols[1]] = a[np.ix_(rows[2], cols[2])]
    assert out.dtype == ref.dtype
    np.testing.assert_array_equal(out, ref)


def test_seg_dtype_too_small_for_ignore_is_widened():
    raw = make_raw(holes=False, seg_dtype=np.int8)
    out = MultiTaskTransform((H, W), scale_range=(0.5, 0.5))(raw, rng())
    assert out["seg"].dtype == np.int16 and (out["seg"] == 255).any()


@pytest.mark.parametrize("kwargs", [dict(size=(0, 4)), dict(size=(4,)), dict(size=(4, 4), hflip=1.5),
                                    dict(size=(4, 4), scale_range=(2.0, 1.0)),
                                    dict(size=(4, 4), scale_range=(0.0, 1.0)),
                                    dict(size=(4, 4), color_jitter=1.0), dict(size=(4, 4), crop=(4, -1))])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        MultiTaskTransform(**kwargs)


def test_non_rgb_image_dtype_is_rejected():
    raw = make_raw()
    raw["image"] = raw["image"].astype(np.uint16)
    with pytest.raises(TypeError, match="uint8 or float"):
        MultiTaskTransform((H, W))(raw, rng())


class _Tiny(RawDataset):
    num_classes = 8

    def __len__(self):
        return 3

    def read_raw(self, index):
        return make_raw(seed=index)


def test_works_inside_a_raw_dataset_and_is_seed_deterministic():
    ds = _Tiny(transform=MultiTaskTransform((H, W), **TRAIN))
    a, b = ds[(1, 5)], ds[(1, 5)]
    assert a["image"].shape == (3, 40, 56) and a["seg"].shape == (40, 56)
    assert a["depth"].shape == (1, 40, 56) and a["normal"].shape == (3, 40, 56)
    for k in ("image", "seg", "depth", "normal", "boxes", "labels"):
        assert (a[k] == b[k]).all()
    assert a["meta"]["transform"] == b["meta"]["transform"]
    assert ds[1]["meta"]["transform"] == ds[1]["meta"]["transform"]


def test_speed_of_the_full_train_transform_is_printed(capsys):
    """Per-sample time of the full train transform on a 288x384 sample (printed, never asserted): wall
    time, and process CPU time (what a loader worker spends, whatever else the machine runs)."""
    raw = make_raw(h=288, w=384, seed=0)
    t = MultiTaskTransform((288, 384), hflip=0.5, scale_range=(0.5, 2.0), color_jitter=0.4)
    t(raw, rng(0))
    wall, cpu = [], []
    for seed in range(50):
        w0, c0 = time.perf_counter(), time.process_time()
        t(raw, rng(seed))
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    with capsys.disabled():
        print(f"\n[transforms] full train transform, 288x384 (image+seg+depth+normal+boxes): "
              f"median {1e3 * np.median(wall):.2f} ms/sample wall, {1e3 * np.mean(cpu):.2f} ms CPU")


# ---------------------------------------------------------------------------------------------------
# keep_ratio


def test_keep_ratio_fits_the_image_and_pads_bottom_right():
    # 40 x 100 into 64 x 64: factor 0.64 -> 26 x 64 at the top left, rows 26.. padded
    raw = rect_raw(40, 100, (10, 5, 60, 35))
    out = MultiTaskTransform((64, 64), keep_ratio=True)(raw, rng())
    t = out["meta"]["transform"]
    assert t["scaled_size"] == (26, 64) and tuple(t["crop"][:2]) == (0, 0)
    assert out["image"].shape == (64, 64, 3) and out["seg"].shape == (64, 64)
    assert (out["image"][26:] == 0).all() and (out["seg"][26:] == 255).all()
    assert (out["depth"][26:] == 0).all() and (out["normal"][26:] == 0).all()
    assert (out["seg"][:26] != 255).all() and (out["depth"][:26] == 2.0).all()
    # the factors of the rounded size (64/100 across, 26/40 down): the box stays around the rectangle
    np.testing.assert_allclose(out["boxes"][0], np.array([10, 5, 60, 35]) * [0.64, 0.65, 0.64, 0.65], atol=1e-5)
    np.testing.assert_allclose(pixel_box(out["seg"] == 5), out["boxes"][0], atol=1.0)
    # a tall image pads at the right
    tall = MultiTaskTransform((64, 64), keep_ratio=True)(rect_raw(100, 40, (5, 10, 35, 60)), rng())
    assert tall["meta"]["transform"]["scaled_size"] == (64, 26) and (tall["seg"][:, 26:] == 255).all()


@pytest.mark.parametrize("seed", range(4))
def test_keep_ratio_with_augmentation_keeps_everything_aligned(seed):
    """Random scale around 1 and flips: a smaller image stays at the top left, a larger one is cropped at
    random, and the boxes follow the image both ways (back through ``meta["transform"]``)."""
    raw = rect_raw(40, 100, (10, 5, 60, 35))
    t = MultiTaskTransform((64, 64), hflip=0.5, scale_range=(0.7, 1.5), keep_ratio=True)
    out = t(raw, rng(seed))
    p = out["meta"]["transform"]
    hs, ws = p["scaled_size"]
    x0, y0 = p["crop"][:2]
    assert (y0 == 0) if hs <= 64 else (0 <= y0 <= hs - 64)
    assert (x0 == 0) if ws <= 64 else (0 <= x0 <= ws - 64)
    if len(out["boxes"]):
        np.testing.assert_allclose(pixel_box(out["seg"] == 5), out["boxes"][0], atol=1.0)
        if ws <= 64 and hs <= 64:  # nothing cropped away: the boxes map back exactly
            np.testing.assert_allclose(boxes_to_original(out["boxes"], p)[0], [10, 5, 60, 35], atol=1e-3)


def test_keep_ratio_from_the_config_for_both_splits():
    data = DataConfig(size=(64, 64), keep_ratio=True, augment=AugmentConfig(hflip=0.5))
    assert build_transform(data, train=True).keep_ratio and build_transform(data, train=False).keep_ratio
    assert not build_transform(DataConfig(size=(64, 64)), train=False).keep_ratio
