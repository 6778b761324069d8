"""CocoDetection ("coco"): the official COCO instances format read back exactly; bad files fail naming the
file and the field."""

import copy
import json
import pickle
import re

import cv2
import numpy as np
import pytest
import torch

from mtvision.config import ConfigError, DataConfig
from mtvision.data import DATASETS, CocoDetection, build_dataset, collate_samples
from mtvision.data.sample import DataError, SkippedSample

from .fixtures import distinct_image

IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

# Categories listed out of id order, with id gaps: labels follow the ids 1, 3, 7.
CATEGORIES = [{"id": 7, "name": "zebra", "supercategory": "animal"},
              {"id": 1, "name": "person", "supercategory": "person"},
              {"id": 3, "name": "car", "supercategory": "vehicle"}]
CLASSES = ("person", "car", "zebra")
# (file name, (H, W)) by image id; listed out of id order too
IMAGES = {42: ("a.jpg", (20, 30)), 5: ("b.png", (16, 24)), 17: ("c.png", (12, 10))}
ANNOTATIONS = [  # (image id, category id, [x, y, w, h], iscrowd)
    (42, 3, [2, 3, 10, 5], 0),          # -> [2, 3, 12, 8], label 1
    (42, 7, [25, 15, 10, 10], 0),       # partly outside 30x20 -> [25, 15, 30, 20], label 2
    (42, 1, [0, 0, 5, 5], 1),           # crowd: dropped
    (5, 1, [4, 4, 0, 6], 0),            # zero width: dropped
    (5, 1, [1.5, 2.5, 4, 3], 0),        # -> [1.5, 2.5, 5.5, 5.5], label 0
    (5, 7, [-3, 10, 6, 20], 0),         # -> clipped [0, 10, 3, 16], label 2
    (5, 3, [30, 0, 5, 5], 0),           # right of the 24-wide image: nothing left after clipping
]
# Expected per image id (ascending: 5, 17, 42): xyxy boxes and labels after filtering and clipping
EXPECTED = {
    5: ([[1.5, 2.5, 5.5, 5.5], [0, 10, 3, 16]], [0, 2]),
    17: ([], []),
    42: ([[2, 3, 12, 8], [25, 15, 30, 20]], [1, 2]),
}


def coco_doc() -> dict:
    images = [{"id": iid, "file_name": name, "height": h, "width": w}
              for iid, (name, (h, w)) in IMAGES.items()]
    anns = [{"id": k + 1, "image_id": iid, "category_id": cid, "bbox": bbox, "iscrowd": crowd,
             "area": float(bbox[2] * bbox[3]), "segmentation": [[0, 0, 1, 0, 1, 1]]}
            for k, (iid, cid, bbox, crowd) in enumerate(ANNOTATIONS)]
    return {"info": {"description": "test"}, "licenses": [], "images": images, "annotations": anns,
            "categories": copy.deepcopy(CATEGORIES)}


def write_coco(root, split="train", naming="plain", doc=None):
    """The fixture in COCO's layout; ``naming="2017"`` uses ``instances_{split}2017.json`` and
    ``{split}2017/``. Returns ``(annotation file, {file name: RGB image written})``."""
    suffix = "2017" if naming == "2017" else ""
    image_dir = root / f"{split}{suffix}"
    image_dir.mkdir(parents=True)
    written = {}
    for k, (name, (h, w)) in enumerate(IMAGES.values()):
        # smooth (JPEG keeps it closely) and different per channel (a BGR mix-up cannot pass)
        yy, xx = np.mgrid[:h, :w]
        rgb = np.stack([xx * 8, yy * 10, np.full_like(xx, 200 - 40 * k)], axis=-1).astype(np.uint8)
        rgb[:4, :4] = distinct_image(4, 4, offset=k)  # a distinct corner, exact in the PNGs
        assert cv2.imwrite(str(image_dir / name), rgb[..., ::-1])
        written[name] = rgb
    ann = root / "annotations" / f"instances_{split}{suffix}.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(coco_doc() if doc is None else doc))
    return ann, written


def test_boxes_labels_classes_and_meta(tmp_path):
    ann, written = write_coco(tmp_path, "train")
    ds = CocoDetection(tmp_path, "train", **IDENTITY)
    assert DATASETS["coco"] is CocoDetection
    assert ds.ann_file == ann and ds.image_dir == tmp_path / "train"
    assert len(ds) == 3 and ds.classes == CLASSES and ds.num_classes == 3 and ds.cat_ids == (1, 3, 7)
    assert ds.image_ids.tolist() == [5, 17, 42]
    for k, iid in enumerate((5, 17, 42)):
        raw = ds.read_raw(k)
        name, hw = IMAGES[iid]
        assert set(raw) == {"image", "boxes", "labels", "meta"}  # no seg / depth / normal
        meta = raw["meta"]
        assert meta["image_id"] == iid and meta["size"] == hw and meta["file_name"] == name
        assert meta["source"] == str(tmp_path / "train" / name)
        assert meta["files"] == [meta["source"], str(ann)]
        assert raw["image"].dtype == np.uint8 and raw["image"].shape == (*hw, 3)
        if name.endswith(".png"):
            assert np.array_equal(raw["image"], written[name])  # RGB order
        else:
            assert np.abs(raw["image"].astype(int) - written[name])[4:, 4:].mean() < 4  # JPEG, in RGB order
        boxes, labels = EXPECTED[iid]
        assert raw["boxes"].dtype == np.float32 and raw["boxes"].shape == (len(boxes), 4)
        np.testing.assert_array_equal(raw["boxes"], np.array(boxes, dtype=np.float32).reshape(-1, 4))
        assert raw["labels"].dtype == np.int64 and raw["labels"].tolist() == labels
        sample = ds[k]
        assert sample["boxes"].shape == (len(boxes), 4) and sample["labels"].dtype == torch.int64
        assert sample["image"].shape == (3, *hw)
    # the dataset keeps arrays only: it pickles small to DataLoader workers and reads the same back
    blob = pickle.dumps(ds)
    assert len(blob) < 4000
    again = pickle.loads(blob)
    assert torch.equal(again[2]["boxes"], ds[2]["boxes"])


def test_2017_naming_build_dataset_and_loader(tmp_path):
    ann, _ = write_coco(tmp_path, "val", naming="2017")
    data = DataConfig(dataset="coco", root=str(tmp_path), tasks=["det"], num_classes=3, size=(8, 12),
                      batch_size=3, num_workers=0)
    ds = build_dataset(data, "val")
    assert isinstance(ds, CocoDetection) and ds.ann_file == ann and ds.image_dir == tmp_path / "val2017"
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_samples)
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 3, 8, 12) and set(batch) == {"image", "boxes", "labels", "meta"}
    assert isinstance(batch["boxes"], list) and len(batch["boxes"]) == 3 and len(batch["labels"]) == 3
    for k, iid in enumerate((5, 17, 42)):
        h, w = IMAGES[iid][1]
        boxes, labels = EXPECTED[iid]
        scale = torch.tensor([12 / w, 8 / h, 12 / w, 8 / h])
        expected = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale
        torch.testing.assert_close(batch["boxes"][k], expected)
        assert batch["labels"][k].tolist() == labels and batch["meta"][k]["image_id"] == iid
    # training split: the augmentation moves the boxes with the image and keeps them inside it
    data.train_split = "val"
    data.augment.hflip, data.augment.scale_range = 1.0, (1.5, 1.5)
    sample = build_dataset(data, "train")[2]
    assert sample["image"].shape == (3, 8, 12) and len(sample["boxes"]) == len(sample["labels"]) >= 1
    assert (sample["boxes"] >= 0).all() and (sample["boxes"][:, 2] <= 12).all()


def test_plain_naming_preferred_and_missing_paths_listed(tmp_path):
    with pytest.raises(ConfigError, match=r"data.root: no COCO annotation file .*instances_val.json, "
                                          r".*instances_val2017.json"):
        CocoDetection(tmp_path, "val")
    write_coco(tmp_path, "val")
    (tmp_path / "val").rename(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=r"data.root: no image folder .*tried .*val, .*val2017"):
        CocoDetection(tmp_path, "val")
    (tmp_path / "elsewhere").rename(tmp_path / "val2017")  # plain annotation file, 2017 image folder
    assert CocoDetection(tmp_path, "val").image_dir == tmp_path / "val2017"


def test_tasks_num_classes_and_kwargs_checked(tmp_path):
    ann, _ = write_coco(tmp_path, "train")
    for tasks in (("seg",), ("det", "depth"), ()):
        with pytest.raises(ConfigError, match=r"data.tasks: .*det"):
            CocoDetection(tmp_path, "train", tasks=tasks)
    message = f"data.num_classes: 80 classes, but {ann} lists 3 categories"
    with pytest.raises(ConfigError, match=re.escape(message)):
        CocoDetection(tmp_path, "train", num_classes=80)
    data = DataConfig(dataset="coco", root=str(tmp_path), tasks=["det"], num_classes=4, size=(8, 12))
    with pytest.raises(ConfigError, match=r"data.num_classes: 4 classes, but .*instances_train.json"):
        build_dataset(data, "train")
    data.num_classes, data.tasks = 3, ["seg"]
    with pytest.raises(ConfigError, match=r"data.tasks"):
        build_dataset(data, "train")
    data.tasks, data.kwargs = ["det"], {"year": 2017}
    with pytest.raises(ConfigError, match=r"data.kwargs.year: unexpected argument for the coco dataset \(accepted: none\)"):
        build_dataset(data, "train")


def _set(path, value):
    def edit(doc):
        *keys, last = path
        obj = doc
        for key in keys:
            obj = obj[key]
        if value is _DELETE:
            del obj[last]
        else:
            obj[last] = value
    return edit


_DELETE = object()

MALFORMED = [
    (_set(("annotations", 4, "bbox"), [1, 2]), "annotations[4].bbox",
     r"expected 4 numbers \[x, y, w, h\], got \[1, 2\]"),
    (_set(("annotations", 4, "bbox"), [1, 2, "3", 4]), "annotations[4].bbox", r"expected 4 numbers"),
    (_set(("annotations", 1, "bbox"), [1, 2, -3, 4]), "annotations[1].bbox",
     r"expected width and height >= 0, got \[1, 2, -3, 4\]"),
    (_set(("annotations", 5, "bbox"), _DELETE), "annotations[5].bbox", r"missing"),
    (_set(("annotations", 3, "category_id"), 99), "annotations[3].category_id", r"unknown category 99"),
    (_set(("annotations", 0, "image_id"), 999), "annotations[0].image_id", r"unknown image 999"),
    (_set(("annotations", 2, "iscrowd"), 2), "annotations[2].iscrowd", r"expected 0 or 1, got 2"),
    (_set(("images", 2, "file_name"), _DELETE), "images[2].file_name", r"missing"),
    (_set(("images", 1, "id"), "5"), "images[1].id", r"expected an integer, got '5'"),
    (_set(("images", 1, "id"), 42), "images[1].id", r"duplicate image id 42 \(also images\[0\]\)"),
    (_set(("images", 0, "height"), 0), "images[0].height", r"expected a positive integer"),
    (_set(("categories", 2, "id"), 7), "categories[2].id", r"duplicate category id 7"),
    (_set(("categories", 0, "name"), _DELETE), "categories[0].name", r"missing"),
    (_set(("categories",), []), "categories", r"empty"),
    (_set(("annotations",), _DELETE), "annotations", r"missing"),
    (_set(("images",), {"id": 1}), "images", r"expected a list, got dict"),
    (_set(("annotations", 6), 3), "annotations[6]", r"expected an object, got int"),
]


@pytest.mark.parametrize("edit,field,message", MALFORMED, ids=[m[1] + ":" + m[2][:12] for m in MALFORMED])
def test_malformed_annotation_file_names_file_and_field(tmp_path, edit, field, message):
    doc = coco_doc()
    edit(doc)
    ann, _ = write_coco(tmp_path, "train", doc=doc)
    with pytest.raises(DataError, match=re.escape(f"{ann}: {field}: ") + message) as e:
        CocoDetection(tmp_path, "train")
    assert e.value.path == str(ann) and e.value.field == field


def test_not_json_names_the_file(tmp_path):
    ann, _ = write_coco(tmp_path, "train")
    ann.write_text('{"images": [')
    with pytest.raises(DataError, match=r"cannot read the JSON file") as e:
        CocoDetection(tmp_path, "train")
    assert e.value.path == str(ann)
    ann.write_text("[]")
    with pytest.raises(DataError, match=r"expected a JSON object"):
        CocoDetection(tmp_path, "train")


def test_missing_corrupt_and_wrong_size_images(tmp_path):
    ann, _ = write_coco(tmp_path, "train")
    (tmp_path / "train" / "b.png").unlink()  # image id 5: sample 0
    (tmp_path / "train" / "a.jpg").write_bytes(b"not a jpeg")  # image id 42: sample 2
    ds = CocoDetection(tmp_path, "train")
    with pytest.raises(DataError, match=r"b.png: image: file not found") as e:
        ds[0]
    assert e.value.path == str(tmp_path / "train" / "b.png") and e.value.field == "image"
    intact = ds[1]  # image id 17 reads as usual: its 12x10 image, no box
    assert intact["image"].shape == (3, *IMAGES[17][1]) and intact["boxes"].shape == (0, 4)
    with pytest.raises(DataError, match=r"a.jpg: image: cannot decode"):
        ds[2]
    skipping = CocoDetection(tmp_path, "train", skip_bad=True)
    assert isinstance(skipping[0], SkippedSample) and isinstance(skipping[2], SkippedSample)
    batch = collate_samples([skipping[k] for k in range(3)])
    assert batch["num_skipped"] == 2 and [m["image_id"] for m in batch["meta"]] == [17]
    # an image whose size differs from its record's height / width
    cv2.imwrite(str(tmp_path / "train" / "c.png"), np.zeros((12, 11, 3), np.uint8))
    with pytest.raises(DataError, match=r"c.png: image: decoded size 12x11 differs .* 12x10 of images\[2\] "
                                        + re.escape(f"in {ann}")):
        ds[1]
    assert isinstance(skipping[1], SkippedSample)


def test_exif_orientation_is_ignored(tmp_path):
    """COCO's boxes are in the stored pixel frame (PIL without exif_transpose); cv2.imread would rotate."""
    pil = pytest.importorskip("PIL.Image")
    doc = coco_doc()
    doc["images"] = [{"id": 1, "file_name": "rot.jpg", "height": 16, "width": 32}]
    doc["annotations"] = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 8, 16], "iscrowd": 0}]
    write_coco(tmp_path, "train", doc=doc)
    rgb = np.zeros((16, 32, 3), np.uint8)
    rgb[:, :8] = 255  # the boxed object: a white stripe on the left
    im = pil.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    im.save(tmp_path / "train" / "rot.jpg", exif=exif)
    assert cv2.imread(str(tmp_path / "train" / "rot.jpg")).shape == (32, 16, 3)  # what cv2 alone does
    raw = CocoDetection(tmp_path, "train").read_raw(0)
    assert raw["image"].shape == (16, 32, 3)
    x0, y0, x1, y1 = raw["boxes"][0].astype(int)
    assert raw["image"][y0:y1, x0:x1].min() > 200 and raw["image"][:, 12:].max() < 50
