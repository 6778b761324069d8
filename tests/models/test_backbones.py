"""Backbones: levels, strides, ViT input sizes, pretrained weights from local files (never the network)."""

import math

import pytest
import timm
import torch

from mtvision.models import BackboneError, ViTBackbone, build_backbone

H, W = 64, 96


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "convnext_atto", "vit_tiny_patch16_224"])
def test_levels_match_out_channels_and_strides(name):
    torch.manual_seed(0)
    bb = build_backbone(name).eval()
    assert bb.strides == [4, 8, 16, 32]
    with torch.no_grad():
        feats = bb(torch.randn(2, 3, H, W))
    assert len(feats) == len(bb.out_channels) == 4
    for f, c, s in zip(feats, bb.out_channels, bb.strides):
        assert f.shape == (2, c, math.ceil(H / s), math.ceil(W / s))
        assert f.dtype == torch.float32 and torch.isfinite(f).all()


def test_vit_pyramid_channels_and_block_choice():
    bb = build_backbone("vit_tiny_patch16_224")
    assert isinstance(bb, ViTBackbone)
    assert bb.out_channels == [48, 96, 192, 192]
    assert len(bb.vit.blocks) == 12
    # Four blocks, one per level: later blocks are pruned.
    bb4 = build_backbone("vit_tiny_patch16_224", out_indices=[2, 5, 8, 9])
    assert len(bb4.vit.blocks) == 10
    feats = bb4(torch.randn(1, 3, 32, 48))
    assert [tuple(f.shape[-2:]) for f in feats] == [(8, 12), (4, 6), (2, 3), (1, 1)]


def test_vit_any_size_divisible_by_patch_and_clear_error_otherwise():
    bb = build_backbone("vit_tiny_patch16_224").eval()
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 48, 80))  # not 224x224: position embeddings are resized
    assert feats[2].shape[-2:] == (3, 5)
    with pytest.raises(ValueError, match="divisible by the patch size 16.*50x80"):
        bb(torch.randn(1, 3, 50, 80))


PATCH14 = ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2", "eva02_tiny_patch14_224"]


@pytest.mark.parametrize("name", PATCH14)
def test_patch14_vits_give_a_stride_4_to_32_pyramid(name):
    """DINOv2 (with and without registers) and EVA-02: patch 14 is not a multiple of 4, so the pyramid is
    resampled from the stride-14 tokens (DPT's way) to strides 4..32, ceil(H / stride) high; an input
    that is not a multiple of 14 is refused with the sizes."""
    torch.manual_seed(0)
    bb = build_backbone(name, out_indices=[0, 1, 1, 1], timm_kwargs={"depth": 2}).eval()
    assert isinstance(bb, ViTBackbone) and bb.patch_size == 14 and bb.strides == [4, 8, 16, 32]
    d = bb.vit.embed_dim
    assert bb.out_channels == [d // 4, d // 2, d, d]
    h, w = 112, 140  # 8 x 10 patches
    with torch.no_grad():
        feats = bb(torch.randn(2, 3, h, w))
    for f, c, s in zip(feats, bb.out_channels, bb.strides):
        assert f.shape == (2, c, math.ceil(h / s), math.ceil(w / s)), (f.shape, s)
        assert torch.isfinite(f).all()
    # the finest level comes from the shallow block, the others from block 1: changing block 1's output
    # (its MLP) leaves level 0 alone
    with torch.no_grad():
        x = torch.randn(1, 3, h, w)
        before = bb(x)
        bb.vit.blocks[1].mlp.fc2.bias.add_(1.0)
        after = bb(x)
    assert torch.equal(before[0], after[0]) and not torch.equal(before[1], after[1])
    with pytest.raises(ValueError, match="divisible by the patch size 14.*112x128"):
        bb(torch.randn(1, 3, 112, 128))


def test_patch14_vit_trains_a_step():
    from mtvision.models import build_model

    torch.manual_seed(0)
    model = build_model({"backbone": {"name": "vit_small_patch14_dinov2", "pretrained": None,
                                      "timm_kwargs": {"depth": 1}},
                         "neck": {"name": "fpn", "out_channels": 16},
                         "heads": {"seg": {"name": "segmentation", "num_classes": 3, "channels": 16},
                                   "depth": {"name": "depth", "channels": 16}}})
    out = model(torch.randn(2, 3, 56, 70))
    assert out["seg"].shape == (2, 3, 56, 70) and out["depth"].shape == (2, 1, 56, 70)
    (out["seg"].mean() + out["depth"].mean()).backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads[:5])  # reaches the patch embedding


def test_timm_kwargs_key_that_is_not_an_argument_name_is_named():
    """YAML's ``{depth:2}`` is one key "depth:2" with value null, which timm would drop silently."""
    with pytest.raises(BackboneError, match="'depth:2' is not an argument name.*space after the colon") as e:
        build_backbone("vit_tiny_patch16_224", timm_kwargs={"depth:2": None})
    assert e.value.key == "timm_kwargs"


def test_vit_bad_block_indices():
    with pytest.raises(BackboneError, match="out of range") as e:
        build_backbone("vit_tiny_patch16_224", out_indices=[12])
    assert e.value.key == "out_indices"
    with pytest.raises(BackboneError, match="1 or 4"):
        build_backbone("vit_tiny_patch16_224", out_indices=[1, 2])


def test_unknown_name_suggests_close_matches():
    with pytest.raises(BackboneError, match="unknown timm model 'resnet_18'.*resnet18") as e:
        build_backbone("resnet_18")
    assert e.value.key == "name"


# ---------------------------------------------------------------------------------------------------
# Pretrained from a local file


@pytest.fixture
def no_network(monkeypatch, refuse_sockets):
    """Fail loudly if anything tries to open a connection or use timm's download helpers."""
    refuse = refuse_sockets
    import timm.models._builder as builder

    for fn in ("load_state_dict_from_url", "load_state_dict_from_hf", "download_cached_file", "load_custom_from_hf"):
        if hasattr(builder, fn):
            monkeypatch.setattr(builder, fn, refuse)


def _source_state_dict(name):
    """A timm model's full state dict with non-default values everywhere (BN stats included)."""
    torch.manual_seed(1234)
    src = timm.create_model(name)
    sd = src.state_dict()
    g = torch.Generator().manual_seed(7)
    for k, v in sd.items():
        if v.is_floating_point():
            v.copy_(torch.rand(v.shape, generator=g) + 0.5)
    return sd


def _src_key(key, src):
    # features_only flattens top-level Sequentials: "stages_0.x" is "stages.0.x" in the full model.
    return key if key in src else key.replace("_", ".", 1)


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "vit_tiny_patch16_224"])
def test_pretrained_from_local_file(tmp_path, no_network, name):
    sd = _source_state_dict(name)
    path = tmp_path / f"{name}.pth"
    torch.save(sd, path)
    torch.manual_seed(0)
    bb = build_backbone(name, pretrained=str(path))
    loaded = bb.vit.state_dict() if isinstance(bb, ViTBackbone) else bb.body.state_dict()
    assert len(loaded) > 10
    for k, v in loaded.items():
        assert torch.equal(v, sd[_src_key(k, sd)]), k


def test_pretrained_safetensors_and_wrapped_checkpoint(tmp_path, no_network):
    from safetensors.torch import save_file

    sd = _source_state_dict("resnet18")
    st = tmp_path / "r18.safetensors"
    save_file(sd, str(st))
    wrapped = tmp_path / "r18_ckpt.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, wrapped)
    for path in (st, wrapped):
        bb = build_backbone("resnet18", pretrained=str(path))
        assert torch.equal(bb.body.conv1.weight, sd["conv1.weight"])
        assert torch.equal(bb.body.layer4[1].bn2.running_var, sd["layer4.1.bn2.running_var"])


def test_pretrained_without_classifier_is_accepted(tmp_path, no_network):
    sd = {k: v for k, v in _source_state_dict("resnet18").items() if not k.startswith("fc.")}
    path = tmp_path / "headless.pth"
    torch.save(sd, path)
    bb = build_backbone("resnet18", pretrained=str(path))
    assert torch.equal(bb.body.layer1[0].conv1.weight, sd["layer1.0.conv1.weight"])


def test_pretrained_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone("resnet18", pretrained=str(path))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone("vit_tiny_patch16_224", pretrained=str(path))


def test_pretrained_mismatch_names_file_and_keys(tmp_path, no_network):
    sd = _source_state_dict("resnet18")
    path = tmp_path / "r18.pth"
    torch.save(sd, path)
    with pytest.raises(BackboneError, match=r"r18\.pth.*resnet50.*missing keys: .*layer1\.0\.conv3\.weight") as e:
        build_backbone("resnet50", pretrained=str(path))
    assert e.value.key == "pretrained"
    sd["extra.weight"] = torch.zeros(3)
    del sd["conv1.weight"]
    torch.save(sd, path)
    with pytest.raises(BackboneError, match=r"missing keys: conv1\.weight.*unexpected keys: extra\.weight"):
        build_backbone("resnet18", pretrained=str(path))
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="cannot read .*garbage.pth"):
        build_backbone("resnet18", pretrained=str(bad))
