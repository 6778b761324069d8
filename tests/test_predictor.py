"""mtvision.Predictor: predictions at each image's own size equal the model run on the resized image and
resized back (stretched or with the aspect ratio kept), boxes mapped back as --coco-export maps them."""

from __future__ import annotations

import functools

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mtvision
from mtvision.data.sample import DataError
from mtvision.evaluation.coco_export import CocoResultsExporter
from mtvision.inference import Predictor

from .predictor_helpers import (  # noqa: F401 - one_torch_thread: autouse fixture
    SIZE,
    one_torch_thread,
    smooth_image,
    tiny_det_config,
    tiny_det_model,
    write_checkpoint,
)

MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predictor")
    return {kr: write_checkpoint(tmp / f"keep_ratio_{kr}.pth", keep_ratio=kr) for kr in (False, True)}


@pytest.fixture(scope="module")
def predictors(checkpoints):
    return {kr: Predictor(checkpoint=path, device="cpu") for kr, path in checkpoints.items()}


@functools.lru_cache
def reference_model(keep_ratio: bool):
    return tiny_det_model(tiny_det_config(keep_ratio))


def reference(image: np.ndarray, keep_ratio: bool):
    """The model on the image resized (as the evaluation transform does: area when shrinking, bilinear when
    enlarging; with keep_ratio fitted inside and padded at the bottom right), outputs cropped to the image
    and resized back bilinearly; boxes scaled back."""
    model = reference_model(keep_ratio)
    H0, W0 = image.shape[:2]
    h, w = SIZE
    if keep_ratio:
        r = min(h / H0, w / W0)
        h, w = round(H0 * r), round(W0 * r)
    shrink = h <= H0 and w <= W0
    resized = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    canvas = np.zeros((*SIZE, 3), np.uint8)
    canvas[:h, :w] = resized
    x = torch.from_numpy(((canvas / np.float32(255.0) - MEAN) / STD).astype(np.float32).transpose(2, 0, 1))
    with torch.no_grad():
        out = model(x[None])
        det = model.heads["det"].predict(out["det"], SIZE)[0]

    def back(t):
        return F.interpolate(t[:, :, :h, :w], size=(H0, W0), mode="bilinear", align_corners=False)[0]

    logits = back(out["seg"])
    normal = F.normalize(back(F.normalize(out["normal"], dim=1)), dim=0)
    scale = np.array([W0 / w, H0 / h, W0 / w, H0 / h])
    boxes = (det["boxes"].double().numpy() * scale).clip(0, [W0, H0, W0, H0])
    return {"seg": logits.argmax(0).numpy(), "seg_probs": torch.softmax(logits, 0).numpy(),
            "depth": back(out["depth"])[0].numpy(), "normal": normal.permute(1, 2, 0).numpy(),
            "boxes": boxes, "scores": det["scores"].numpy(), "labels": det["labels"].numpy()}


@pytest.mark.parametrize("keep_ratio", [False, True])
@pytest.mark.parametrize("hw", [(97, 131), (131, 97), (40, 50)])  # landscape, portrait, enlarged
def test_maps_at_the_image_size_equal_the_model_resized_back(predictors, keep_ratio, hw):
    image = smooth_image(*hw, seed=hw[0])
    pred = predictors[keep_ratio](image, seg_probs=True)
    ref = reference(image, keep_ratio)
    H, W = hw
    assert pred["seg"].shape == (H, W) and pred["seg"].dtype == np.uint8
    assert pred["seg_probs"].shape == (6, H, W)
    assert pred["depth"].shape == (H, W) and pred["depth"].dtype == np.float32
    assert pred["normal"].shape == (H, W, 3)
    np.testing.assert_array_equal(pred["seg"], ref["seg"])
    assert len(np.unique(pred["seg"])) > 1  # the test sees label boundaries
    np.testing.assert_allclose(pred["seg_probs"], ref["seg_probs"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred["depth"], ref["depth"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred["normal"], ref["normal"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(pred["normal"], axis=2), 1.0, atol=1e-5)
    det = pred["det"]
    assert len(det["boxes"]) > 0 and det["boxes"].dtype == np.float32
    np.testing.assert_allclose(det["boxes"], ref["boxes"], rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(det["labels"], ref["labels"])
    np.testing.assert_allclose(det["scores"], ref["scores"], rtol=1e-6)


@pytest.mark.parametrize("keep_ratio", [False, True])
def test_boxes_map_back_as_the_coco_export_does(predictors, keep_ratio):
    predictor = predictors[keep_ratio]
    image = smooth_image(131, 97, seed=3)
    x, transform = predictor.preprocess(image)
    det_in = predictor.forward(x[None])["det"][0]
    exporter = CocoResultsExporter(cat_ids=list(range(10, 16)))
    exporter.add([det_in], [{"image_id": 7, "transform": transform}])
    det = predictor(image)["det"]
    xywh = np.array([r["bbox"] for r in exporter.results()]).reshape(-1, 4)
    assert len(xywh) == len(det["boxes"]) > 0
    np.testing.assert_allclose(det["boxes"][:, :2], xywh[:, :2], rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(det["boxes"][:, 2:], xywh[:, :2] + xywh[:, 2:], rtol=1e-6, atol=1e-4)
    assert [r["category_id"] - 10 for r in exporter.results()] == det["labels"].tolist()


def test_batch_of_mixed_sizes_and_files_equals_one_by_one(checkpoints, tmp_path):
    predictor = Predictor(checkpoints[True], device="cpu", batch_size=2)
    images = [smooth_image(97, 131, 1), smooth_image(131, 97, 2), smooth_image(40, 50, 3)]
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), images[1][..., ::-1])
    batch = predictor.batch([images[0], path, images[2]])
    for got, image in zip(batch, images):
        one = predictor(image)
        assert got["seg"].shape == image.shape[:2]
        assert (got["seg"] == one["seg"]).mean() >= 0.999
        np.testing.assert_allclose(got["depth"], one["depth"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["det"]["boxes"], one["det"]["boxes"], rtol=1e-4, atol=1e-2)


def test_construction_forms_and_input_errors(checkpoints, tmp_path):
    assert mtvision.Predictor is Predictor
    predictor = mtvision.Predictor(checkpoints[False], device="cpu", amp="none")
    assert predictor.backend == "torch" and predictor.tasks == ["seg", "depth", "normal", "det"]
    assert predictor.size == SIZE and predictor.keep_ratio is False
    assert predictor.class_names == ("floor", "wall", "ceiling", "box", "sphere", "cylinder")
    grey = predictor(np.full((30, 20), 128, np.uint8))
    assert grey["depth"].shape == (30, 20)
    with pytest.raises(ValueError, match=r"expected an RGB image \[H, W, 3\]"):
        predictor(np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(DataError, match="cannot decode"):
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"not a png")
        predictor(bad)
    with pytest.raises(FileNotFoundError):
        Predictor(checkpoint=tmp_path / "missing.pth")
