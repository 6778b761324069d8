"""ONNX export: the file computes what the PyTorch model does (onnxruntime), with a dynamic batch and
size, the normalisation in the graph when asked, its metadata, and clear errors."""

from __future__ import annotations

import builtins

import pytest
import torch

from mtvision.export import (
    ExportError,
    check_onnx,
    export_onnx,
    onnx_outputs,
    read_onnx_metadata,
    size_multiple,
)
from mtvision.models import build_model

from ..engine.helpers import TINY

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tiny_model(**model_overrides) -> torch.nn.Module:
    """The engine tests' tiny model (test_resnet, 16-channel FPN and heads) with sections replaced."""
    torch.manual_seed(0)
    return build_model({**TINY["model"], **model_overrides}).eval()


@pytest.fixture(scope="module")
def dynamic_file(tmp_path_factory):
    """The tiny FPN model exported with a dynamic batch and image size."""
    model = tiny_model()
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "sub" / "tiny.onnx", (32, 48),
                       mean=MEAN, std=STD, dynamic_size=True)
    return model, path


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 3, 32, 48), (1, 3, 48, 49), (3, 3, 64, 32)])
def test_file_matches_pytorch_at_any_batch_and_size(dynamic_file, shape):
    model, path = dynamic_file
    images = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    diffs = check_onnx(path, model, images)
    assert list(diffs) == ["seg", "depth", "normal"]
    assert max(diffs.values()) < 1e-4
    outs = onnx_outputs(path, images)
    assert outs["seg"].shape == (shape[0], 6, *shape[2:])
    assert outs["depth"].shape == (shape[0], 1, *shape[2:]) and bool((outs["depth"] > 0).all())
    assert outs["normal"].shape == (shape[0], 3, *shape[2:])


@pytest.mark.slow
def test_metadata_says_what_the_file_takes_and_gives(dynamic_file):
    _, path = dynamic_file
    meta = read_onnx_metadata(path)
    assert meta["tasks"] == ["seg", "depth", "normal"]
    assert meta["mean"] == pytest.approx(MEAN) and meta["std"] == pytest.approx(STD)
    assert meta["raw_input"] is False and meta["dynamic_size"] is True
    assert meta["image_size"] == [32, 48] and meta["size_multiple"] == 1
    assert "logits" in meta["outputs"]["seg"] and "metres" in meta["outputs"]["depth"]
    assert "unit length" in meta["outputs"]["normal"]
    assert "mean) / std" in meta["input"]


@pytest.fixture(scope="module")
def static_file(tmp_path_factory):
    """The tiny model, in training mode, exported with a fixed batch of 1 at 64x64; with its state from
    before the export."""
    model = tiny_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_onnx(model, tmp_path_factory.mktemp("onnx_static") / "static.onnx", (64, 64),
                       dynamic_batch=False)
    return model, before, path


@pytest.mark.slow
def test_export_leaves_the_model_as_it_was(static_file):
    model, before, _ = static_file
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats too


@pytest.mark.slow
def test_raw_input_file_normalises_in_the_graph(tmp_path):
    model = tiny_model()
    path = export_onnx(model, tmp_path / "raw.onnx", (32, 48), mean=MEAN, std=STD, raw_input=True)
    assert read_onnx_metadata(path)["raw_input"] is True
    rgb = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    got = onnx_outputs(path, rgb)
    normalised = (rgb - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model(normalised)
    for task in model.tasks:
        torch.testing.assert_close(got[task], expected[task], rtol=1e-4, atol=1e-4)
    assert max(check_onnx(path, model, rgb).values()) < 1e-4  # reads raw_input from the metadata


@pytest.mark.slow
def test_static_batch_file_has_a_fixed_batch(static_file):
    import onnxruntime

    model, _, path = static_file  # in training mode: check_onnx runs it in eval mode, as exported
    check_onnx(path, model, torch.randn(1, 3, 64, 64))
    with pytest.raises(onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument):
        onnx_outputs(path, torch.randn(2, 3, 64, 64))


@pytest.mark.slow
def test_a_model_that_cannot_run_at_the_size_gets_the_cause(tmp_path):
    # batch 1 at 32x32: the stride-32 level is 1x1 and GroupNorm has one value per group
    with pytest.raises(ExportError, match=r"static\.onnx failed: ValueError: Expected more than 1 value"):
        export_onnx(tiny_model(), tmp_path / "static.onnx", (32, 32), dynamic_batch=False)


@pytest.mark.slow
def test_check_names_the_output_that_differs(dynamic_file):
    model, path = dynamic_file
    changed = tiny_model()
    with torch.no_grad():
        changed.heads["depth"].decoder.predict.bias.add_(0.5)
    with pytest.raises(ExportError, match=r"output 'depth' differs from PyTorch by up to 0\.[0-9]"):
        check_onnx(path, changed, torch.randn(1, 3, 32, 48))


@pytest.mark.slow
def test_dilated_backbone_with_deeplab_heads_exports(tmp_path):
    """The LibMTL / MTAN protocol model's shape: dilated backbone, no neck, one DeepLab head per task."""
    model = tiny_model(
        backbone={"name": "test_resnet", "pretrained": None, "output_stride": 8},
        neck={"name": "none"},
        heads={"seg": {"name": "deeplab_segmentation", "num_classes": 5, "channels": 16},
               "depth": {"name": "deeplab_depth", "channels": 16}})
    path = export_onnx(model, tmp_path / "deeplab.onnx", (32, 32))
    diffs = check_onnx(path, model, torch.randn(2, 3, 32, 32))
    assert list(diffs) == ["seg", "depth"]


@pytest.mark.slow
@pytest.mark.parametrize("backbone,patch,bad,size,shapes", [
    ({"name": "vit_tiny_patch16_224", "out_indices": [2]}, 16, (40, 48), (64, 80),
     [(2, 3, 64, 80), (1, 3, 96, 64)]),
    # DINOv2's patch 14 (its pyramid resampled to strides 4..32): sizes that are not multiples of 4 or 8
    ({"name": "vit_small_patch14_dinov2", "out_indices": [1], "timm_kwargs": {"depth": 2}}, 14, (56, 64),
     (56, 70), [(2, 3, 56, 70), (1, 3, 98, 42)]),
])
def test_vit_exports_with_sizes_in_multiples_of_the_patch(tmp_path, backbone, patch, bad, size, shapes):
    model = tiny_model(backbone={**backbone, "pretrained": None})
    assert size_multiple(model) == patch
    with pytest.raises(ExportError, match=f"multiples of {patch}"):
        export_onnx(model, tmp_path / "vit.onnx", bad)
    assert not (tmp_path / "vit.onnx").exists()
    # sizes whose stride-32 level is more than 1x1: a one-pixel map puts one value in each GroupNorm
    # group of the heads, whose normalisation then amplifies float rounding (1e-7 / sqrt(eps)) into
    # differences between any two implementations, not an export error
    path = export_onnx(model, tmp_path / "vit.onnx", size, dynamic_size=True)
    assert read_onnx_metadata(path)["size_multiple"] == patch
    for shape in shapes:
        check_onnx(path, model, torch.randn(*shape, generator=torch.Generator().manual_seed(3)))


@pytest.mark.slow
def test_hiera_exports_through_its_unfused_attention(tmp_path):
    """Hiera's attention is 5-D, which the exporter refuses; the export's copy takes timm's matmul path:
    the file equals PyTorch (fused attention) and the caller's model keeps its fused attention."""
    model = tiny_model(backbone={"name": "hiera_tiny_224", "pretrained": None,  # one block per stage, 128 px
                                 "timm_kwargs": {"stages": [1, 1, 1, 1], "img_size": [128, 128]}})
    fused = [m for m in model.modules() if getattr(m, "fused_attn", False)]
    path = export_onnx(model, tmp_path / "hiera.onnx", (128, 128))
    check_onnx(path, model, torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(3)))
    assert fused and all(m.fused_attn for m in fused)


def test_missing_onnx_packages_name_the_extra(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def without_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime" or name.startswith("onnxruntime."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_onnxruntime)
    with pytest.raises(ExportError, match=r"needs onnxruntime: pip install 'mtvision\[export\]'"):
        export_onnx(tiny_model(), tmp_path / "m.onnx", (32, 32))
