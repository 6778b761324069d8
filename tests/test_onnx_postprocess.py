"""ONNX with the post-processing in the graph (tools/export_onnx.py --postprocess) equals the PyTorch path:
class ids, depth, unit normals, and the same boxes after NMS; Predictor / tools/predict.py --onnx run a file
with onnxruntime alone and give what the checkpoint gives; --fp16."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtvision.export import export_onnx, onnx_outputs, read_onnx_metadata
from mtvision.inference import Predictor, decode_detections_fixed
from mtvision.models.heads import decode_detections

from .predictor_helpers import (  # noqa: F401 - one_torch_thread: autouse fixture
    SIZE,
    load_tool,
    one_torch_thread,
    smooth_image,
    tiny_det_config,
    tiny_det_model,
    write_checkpoint,
)

OUTPUTS = ["seg_labels", "depth", "normal", "det_boxes", "det_scores", "det_labels", "det_count"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny 4-task checkpoint (keep_ratio) exported by the tool with --postprocess (checked by it), and
    exported plain through the API."""
    tmp = tmp_path_factory.mktemp("onnx_pp")
    ckpt = write_checkpoint(tmp / "model.pth", keep_ratio=True)
    post = tmp / "post.onnx"
    argv = ["--checkpoint", str(ckpt), "--out", str(post), "--postprocess"]
    assert load_tool("export_onnx").main(argv) == 0
    cfg = tiny_det_config(keep_ratio=True)
    plain = export_onnx(tiny_det_model(cfg), tmp / "plain.onnx", SIZE,
                        extra_metadata={"keep_ratio": True, "num_classes": 6})
    return tmp, ckpt, post, plain


def network_inputs(n: int = 3) -> torch.Tensor:
    images = [smooth_image(*SIZE, seed=s) for s in range(n)]
    x = np.stack(images).astype(np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def test_tool_writes_the_postprocessed_outputs_and_metadata(files, capsys):
    _, _, post, _ = files
    meta = read_onnx_metadata(post)
    assert meta["postprocess"] is True and meta["fp16"] is False
    assert list(meta["outputs"]) == OUTPUTS
    assert meta["keep_ratio"] is True and meta["num_classes"] == 6
    assert meta["class_names"][:2] == ["floor", "wall"]
    assert meta["detection"]["det"]["max_detections"] == 100
    got = onnx_outputs(post, network_inputs(2))
    assert list(got) == OUTPUTS
    assert got["seg_labels"].dtype == torch.int64 and got["seg_labels"].shape == (2, *SIZE)
    assert got["depth"].shape == (2, *SIZE) and got["normal"].shape == (2, 3, *SIZE)
    assert got["det_boxes"].shape == (2, 100, 4) and got["det_count"].shape == (2,)


def test_graph_equals_the_pytorch_path(files):
    """seg labels >= 99.9 % identical, depth / normals within 1e-4 relative, the same boxes after NMS as
    decode_detections (the head's own decoding, as evaluation and the Predictor use it)."""
    _, _, post, _ = files
    model = tiny_det_model(tiny_det_config(keep_ratio=True))
    x = network_inputs(3)
    got = onnx_outputs(post, x)
    with torch.no_grad():
        out = model(x)
        dets = model.heads["det"].predict(out["det"], SIZE)
    assert (got["seg_labels"] == out["seg"].argmax(1)).float().mean() >= 0.999
    torch.testing.assert_close(got["depth"], out["depth"][:, 0], rtol=1e-4, atol=0)
    # unit vectors: within 1e-4 of their length
    torch.testing.assert_close(got["normal"], F.normalize(out["normal"], dim=1), rtol=0, atol=1e-4)
    assert torch.allclose(got["normal"].norm(dim=1), torch.ones(3, *SIZE), atol=1e-5)
    for b, det in enumerate(dets):
        n = int(got["det_count"][b])
        assert n == len(det["boxes"]) > 0
        torch.testing.assert_close(got["det_boxes"][b, :n], det["boxes"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(got["det_scores"][b, :n], det["scores"], rtol=1e-4, atol=1e-6)
        assert torch.equal(got["det_labels"][b, :n], det["labels"])
        assert bool((got["det_labels"][b, n:] == -1).all()) and bool((got["det_scores"][b, n:] == 0).all())


def test_fixed_decoding_equals_decode_detections_in_pytorch():
    """decode_detections_fixed (what the graph computes) against decode_detections, also with fewer
    candidates than boxes asked for (padding) and a threshold nothing passes."""
    model = tiny_det_model(tiny_det_config())
    with torch.no_grad():
        raw = model(network_inputs(2))["det"]
    for kwargs in ({}, {"max_detections": 5, "nms_threshold": 0.3}, {"max_detections": 10_000},
                   {"score_threshold": 0.999}):
        boxes, scores, labels, count = decode_detections_fixed(raw, SIZE, **kwargs)
        for b, det in enumerate(decode_detections(raw, SIZE, **kwargs)):
            n = int(count[b])
            assert n == len(det["boxes"])
            torch.testing.assert_close(boxes[b, :n], det["boxes"])
            torch.testing.assert_close(scores[b, :n], det["scores"])
            assert torch.equal(labels[b, :n], det["labels"])
        assert boxes.shape[1] == kwargs.get("max_detections", 100)


@pytest.mark.parametrize("hw", [(97, 131), (131, 97)])
def test_predictor_on_onnx_files_equals_the_checkpoint(files, hw):
    _, ckpt, post, plain = files
    image = smooth_image(*hw, seed=5)
    ref = Predictor(ckpt, device="cpu")(image, seg_probs=True)
    for path in (plain, post):
        predictor = Predictor(path)
        assert predictor.backend == "onnxruntime" and predictor.keep_ratio is True and predictor.size == SIZE
        got = predictor(image, seg_probs=path == plain)
        assert got["seg"].shape == hw and got["seg"].dtype == np.uint8
        np.testing.assert_allclose(got["depth"], ref["depth"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got["normal"], ref["normal"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got["det"]["boxes"], ref["det"]["boxes"], rtol=1e-4, atol=1e-3)
        np.testing.assert_array_equal(got["det"]["labels"], ref["det"]["labels"])
        if path == plain:  # logits in the file: resized bilinearly, as in PyTorch
            assert (got["seg"] == ref["seg"]).mean() >= 0.999
            np.testing.assert_allclose(got["seg_probs"], ref["seg_probs"], rtol=1e-4, atol=1e-5)
        else:  # class ids in the file: resized by nearest neighbour
            assert (got["seg"] == ref["seg"]).mean() >= 0.9
            with pytest.raises(ValueError, match="class ids, not probabilities"):
                predictor(image, seg_probs=True)


def test_predict_tool_with_onnx_writes_the_same_files(files, tmp_path):
    tmp, ckpt, post, _ = files
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), smooth_image(97, 131, 7)[..., ::-1])
    predict = load_tool("predict")
    assert predict.main(["--onnx", str(post), "--input", str(folder), "--out", str(tmp_path / "o"),
                         "--no-progress"]) == 0
    assert predict.main(["--checkpoint", str(ckpt), "--input", str(folder), "--out", str(tmp_path / "t"),
                         "--no-progress"]) == 0
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "t").iterdir())
    assert names == ["a_depth.png", "a_det.json", "a_normal.png", "a_seg.png", "a_vis.png"]
    depth_o = cv2.imread(str(tmp_path / "o" / "a_depth.png"), cv2.IMREAD_UNCHANGED).astype(int)
    depth_t = cv2.imread(str(tmp_path / "t" / "a_depth.png"), cv2.IMREAD_UNCHANGED).astype(int)
    assert np.abs(depth_o - depth_t).max() <= 1


@pytest.mark.slow
def test_fp16_and_dynamic_size_files(files, tmp_path):
    _, ckpt, _, _ = files
    export = load_tool("export_onnx")
    half = tmp_path / "half.onnx"
    assert export.main(["--checkpoint", str(ckpt), "--out", str(half), "--postprocess", "--fp16",
                        "--raw-input"]) == 0
    meta = read_onnx_metadata(half)
    assert meta["fp16"] is True and meta["raw_input"] is True
    image = smooth_image(97, 131, seed=9)
    ref = Predictor(ckpt, device="cpu")(image)
    got = Predictor(half)(image)
    assert (got["seg"] == ref["seg"]).mean() >= 0.9
    np.testing.assert_allclose(got["depth"], ref["depth"], rtol=3e-2, atol=1e-2)
    dynamic = tmp_path / "dynamic.onnx"
    assert export.main(["--checkpoint", str(ckpt), "--out", str(dynamic), "--postprocess",
                        "--dynamic-size"]) == 0
    got = Predictor(dynamic)(image)
    np.testing.assert_allclose(got["depth"], ref["depth"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["det"]["boxes"], ref["det"]["boxes"], rtol=1e-4, atol=1e-3)


def _greedy_nms_reference(boxes, scores, iou, score_threshold):
    """Greedy NMS written out in float64: highest score first, drop every later box whose IoU with a
    kept one exceeds ``iou``; only boxes scoring above ``score_threshold`` take part."""
    b, s = boxes.double(), scores.double()
    order = [i for i in sorted(range(len(s)), key=lambda i: -float(s[i])) if s[i] > score_threshold]
    kept = []
    for i in order:
        ok = True
        for j in kept:
            lt, rb = torch.maximum(b[i, :2], b[j, :2]), torch.minimum(b[i, 2:], b[j, 2:])
            inter = (rb - lt).clamp_min(0).prod()
            area = lambda k: (b[k, 2:] - b[k, :2]).clamp_min(0).prod()  # noqa: E731
            if inter / (area(i) + area(j) - inter) > iou:
                ok = False
                break
        if ok:
            kept.append(i)
    keep = torch.zeros(len(s), dtype=torch.bool)
    keep[kept] = True
    return keep


def test_nms_keep_op_against_greedy_reference_and_opcheck():
    from mtvision.inference.postprocess import nms_keep

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 40, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(2, 40, 2, generator=g) * 20], dim=2)
    scores = torch.rand(2, 40, generator=g)
    keep = nms_keep(boxes, scores, 0.5, 0.2)
    assert keep.shape == (2, 40) and keep.dtype == torch.bool
    for i in range(2):
        assert torch.equal(keep[i], _greedy_nms_reference(boxes[i], scores[i], 0.5, 0.2))
    assert 0 < keep.sum() < (scores > 0.2).sum()  # some boxes suppressed, some kept
    torch.library.opcheck(torch.ops.mtvision_inference.nms_keep.default, (boxes, scores, 0.5, 0.2))
