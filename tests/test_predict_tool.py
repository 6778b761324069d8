"""tools/predict.py --input: files, folders and globs predicted at each image's own size, one set of files per
image in the documented encodings, a bad image reported and skipped; the validation-picture mode stays."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from mtvision.data.dense_io import read_depth, read_normal
from mtvision.inference import Predictor
from mtvision.inference.writers import depth_to_png

from .predictor_helpers import load_tool, one_torch_thread, smooth_image, write_checkpoint  # noqa: F401


def predict_tool():
    return load_tool("predict")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A checkpoint, a folder with a landscape PNG, a portrait JPEG and a corrupt file, and a second folder
    reached by a glob."""
    tmp = tmp_path_factory.mktemp("predict_tool")
    ckpt = write_checkpoint(tmp / "model.pth", keep_ratio=True)
    folder, other = tmp / "photos", tmp / "more" / "deep"
    folder.mkdir()
    other.mkdir(parents=True)
    images = {"land": smooth_image(97, 131, 1), "port": smooth_image(131, 97, 2),
              "small": smooth_image(40, 50, 3)}
    cv2.imwrite(str(folder / "land.png"), images["land"][..., ::-1])
    cv2.imwrite(str(folder / "port.jpg"), images["port"][..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 100])
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    (folder / "notes.txt").write_text("not an image")
    cv2.imwrite(str(other / "small.png"), images["small"][..., ::-1])
    return tmp, ckpt, folder


def test_folder_and_glob_written_at_each_image_size(photos, capsys):
    tmp, ckpt, folder = photos
    out = tmp / "out"
    rc = predict_tool().main(["--checkpoint", str(ckpt), "--input", str(folder),
                              str(tmp / "more" / "**" / "*.png"), "--out", str(out), "--depth-npy",
                              "--no-progress", "--batch-size", "2"])
    captured = capsys.readouterr()
    assert rc == 1  # one image could not be read ...
    assert f"skipped {folder / 'broken.png'}" in captured.err and "broken.png" in captured.out
    assert "wrote the predictions of 3 images" in captured.out  # ... the others were predicted
    predictor = Predictor(ckpt, device="cpu")
    for stem in ("land", "port", "small"):
        path = next(p for p in [folder / "land.png", folder / "port.jpg", tmp / "more/deep/small.png"]
                    if p.stem == stem)
        image = cv2.imread(str(path))[..., ::-1]
        pred = predictor(image)
        H, W = image.shape[:2]
        seg = cv2.imread(str(out / f"{stem}_seg.png"), cv2.IMREAD_UNCHANGED)
        assert seg.dtype == np.uint8 and seg.shape == (H, W)
        # the tool batched the images: the same up to float rounding
        assert (seg == pred["seg"]).mean() >= 0.999
        depth_png = cv2.imread(str(out / f"{stem}_depth.png"), cv2.IMREAD_UNCHANGED)
        assert depth_png.dtype == np.uint16 and depth_png.shape == (H, W)
        assert np.abs(depth_png.astype(int) - depth_to_png(pred["depth"])).max() <= 1
        # the custom-dataset reader takes it back: millimetres
        np.testing.assert_allclose(read_depth(out / f"{stem}_depth.png"), pred["depth"], atol=5e-4 + 1e-5)
        np.testing.assert_allclose(np.load(out / f"{stem}_depth.npy"), pred["depth"], rtol=1e-5)
        normal = read_normal(out / f"{stem}_normal.png")
        assert normal.shape == (H, W, 3)
        assert float(np.abs(normal - pred["normal"]).max()) < 0.02  # 8-bit encoding
        det = json.loads((out / f"{stem}_det.json").read_text())
        assert det["size"] == [H, W] and det["image"] == str(path)
        np.testing.assert_allclose(np.array(det["boxes"]).reshape(-1, 4), pred["det"]["boxes"],
                                   rtol=1e-5, atol=1e-3)
        assert det["labels"] == pred["det"]["labels"].tolist()
        names = ("floor", "wall", "ceiling", "box", "sphere", "cylinder")
        assert det["class_names"] == [names[i] for i in det["labels"]]
        vis = cv2.imread(str(out / f"{stem}_vis.png"))
        assert vis.shape[1] == 4 * W  # input with boxes, seg, depth, normal
    assert not list(out.glob("broken*")) and not list(out.glob("notes*"))


def test_missing_input_is_a_user_error(photos, capsys):
    tmp, ckpt, _ = photos
    rc = predict_tool().main(["--checkpoint", str(ckpt), "--input", str(tmp / "nothing" / "*.jpg"), "--out",
                              str(tmp / "x")])
    assert rc == 2 and "no such file" in capsys.readouterr().err


def test_same_stems_do_not_overwrite_and_vis_is_optional(photos):
    tmp, ckpt, folder = photos
    copy = tmp / "copy"
    copy.mkdir()
    (copy / "land.png").write_bytes((folder / "land.png").read_bytes())
    out = tmp / "out_stems"
    rc = predict_tool().main(["--checkpoint", str(ckpt), "--input", str(folder / "land.png"),
                              str(copy / "land.png"), "--out", str(out), "--no-progress", "--no-vis"])
    assert rc == 0
    assert (out / "land_seg.png").is_file() and (out / "land_2_seg.png").is_file()
    assert not list(out.glob("*_vis.png"))


def test_validation_picture_mode_stays(photos):
    tmp, ckpt, _ = photos
    out = tmp / "pictures"
    # (the synthetic validation scenes are rendered at data.size: no keep_ratio)
    argv = ["--checkpoint", str(ckpt), "--out", str(out), "--num", "1", "data.keep_ratio=false"]
    assert predict_tool().main(argv) == 0
    assert [p.name for p in out.glob("*.png")] == ["0000.png"]
