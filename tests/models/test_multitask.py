"""MultiTaskModel and build_model: every backbone end to end, gradients, config errors."""

import pytest
import torch

from mtvision.config import ConfigError, ModelConfig
from mtvision.models import HEADS, MultiTaskModel, build_model

H, W = 64, 96
THREE_HEADS = {
    "seg": {"name": "segmentation", "num_classes": 6, "channels": 32},
    "depth": {"name": "depth", "channels": 32},
    "normal": {"name": "normals", "channels": 32},
}


def _cfg(backbone="resnet18", heads=None, **neck):
    return {
        "backbone": {"name": backbone, "pretrained": None},
        "neck": {"name": "fpn", "out_channels": 32, **neck},
        "heads": THREE_HEADS if heads is None else heads,
    }


def _check_all_grads(model):
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "convnext_atto", "vit_tiny_patch16_224"])
def test_three_tasks_end_to_end(backbone):
    torch.manual_seed(0)
    model = build_model(_cfg(backbone)).train()
    out = model(torch.randn(2, 3, H, W))
    assert set(out) == {"seg", "depth", "normal"}
    assert out["seg"].shape == (2, 6, H, W)
    assert out["depth"].shape == (2, 1, H, W)
    assert out["normal"].shape == (2, 3, H, W)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())
    assert (out["depth"] > 0).all()
    sum(v.mean() for v in out.values()).backward()
    _check_all_grads(model)


def test_single_task_baseline():
    model = build_model(_cfg(heads={"depth": {"name": "depth", "max_depth": 20.0}}))
    assert model.tasks == ["depth"]
    out = model(torch.randn(2, 3, H, W))
    assert list(out) == ["depth"] and out["depth"].shape == (2, 1, H, W)
    assert ((out["depth"] > 0) & (out["depth"] < 20.0)).all()
    out["depth"].mean().backward()
    _check_all_grads(model)


def test_one_task_backward_touches_only_its_head_and_shared():
    model = build_model(_cfg())
    out = model(torch.randn(2, 3, H, W))
    out["normal"].mean().backward()
    assert all(p.grad is not None for p in model.shared_parameters())
    assert all(p.grad is not None for p in model.task_parameters("normal"))
    assert all(p.grad is None for t in ("seg", "depth") for p in model.task_parameters(t))


def test_parameter_groups_partition_the_model():
    model = build_model(_cfg())
    groups = [list(model.shared_parameters())] + [list(model.task_parameters(t)) for t in model.tasks]
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    with pytest.raises(KeyError, match="unknown task 'sem'"):
        model.task_parameters("sem")


def test_features_then_heads_equals_forward():
    torch.manual_seed(0)
    model = build_model(_cfg()).eval()
    x = torch.randn(1, 3, H, W)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert [f.shape[-2:] for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]
        assert all(f.shape[1] == model.neck.out_channels for f in feats)
        split = model.forward_heads(feats, (H, W))
        full = model(x)
    for t in full:
        torch.testing.assert_close(split[t], full[t])


def test_build_from_model_config_dataclass_and_direct_construction():
    model = build_model(ModelConfig())
    assert model.tasks == ["seg", "depth", "normal"]
    assert model.heads["seg"].num_classes == 6
    direct = MultiTaskModel(model.backbone, model.neck, {"seg": model.heads["seg"]}).eval()
    assert direct(torch.randn(1, 3, 32, 32))["seg"].shape == (1, 6, 32, 32)
    assert set(HEADS) == {"segmentation", "depth", "normals",
                          "deeplab_segmentation", "deeplab_depth", "deeplab_normals", "fcos"}


def test_pretrained_through_config(tmp_path):
    import timm

    src = timm.create_model("resnet18")
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    cfg = _cfg()
    cfg["backbone"]["pretrained"] = str(path)
    model = build_model(cfg)
    assert torch.equal(model.backbone.body.layer3[0].conv1.weight, src.layer3[0].conv1.weight)
    cfg["backbone"]["pretrained"] = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match=r"model\.backbone\.pretrained: .*missing\.pth"):
        build_model(cfg)


def _with(path, value):
    cfg = _cfg()
    cfg["heads"] = {k: dict(v) for k, v in cfg["heads"].items()}
    node = cfg
    *parents, last = path
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return cfg


@pytest.mark.parametrize(
    "path, value, match",
    [
        (("heads", "seg", "name"), "segmentaton",
         r"^model\.heads\.seg\.name: unknown head 'segmentaton' \(choose from: segmentation, depth, normals, "
         r"deeplab_segmentation, deeplab_depth, deeplab_normals, fcos\)"),
        (("heads", "seg", "name"), KeyError, r"^model\.heads\.seg\.name: required"),
        (("heads", "seg", "num_classes"), KeyError, r"^model\.heads\.seg\.num_classes: required"),
        (("heads", "seg", "num_classes"), 0, r"^model\.heads\.seg\.num_classes: .*positive int"),
        (("heads", "depth", "max_dpth"), 10, r"^model\.heads\.depth\.max_dpth: unexpected argument.*max_depth"),
        (("heads", "normal", "in_channels"), 3, r"^model\.heads\.normal\.in_channels: set automatically"),
        (("heads", "normal"), [1], r"^model\.heads\.normal: expected a mapping"),
        (("heads",), {}, r"^model\.heads: at least one head"),
        (("neck", "name"), "bifpn", r"^model\.neck\.name: unknown neck 'bifpn' \(choose from: fpn, none\)"),
        (("neck", "out_channels"), -4, r"^model\.neck\.out_channels: .*positive int"),
        (("neck", "width"), 4, r"^model\.neck\.width: unexpected argument"),
        (("backbone", "name"), "resnet_18", r"^model\.backbone\.name: unknown timm model 'resnet_18'"),
        (("backbone", "name"), KeyError, r"^model\.backbone\.name: required"),
        (("backbone", "drop_path_rate"), 0.1, r"^model\.backbone\.drop_path_rate: unexpected key.*timm_kwargs"),
        (("backbone", "timm_kwargs"), {"bogus": 1}, r"^model\.backbone\.timm_kwargs: .*bogus"),
        (("backbone", "out_indices"), [9], r"^model\.backbone\.out_indices: "),
        (("backbone", "pretrained"), 3, r"^model\.backbone\.pretrained: expected null, true .* or a file path"),
        (("extra",), 1, r"^model\.extra: unknown key"),
    ],
)
def test_config_errors_name_the_key(path, value, match):
    with pytest.raises(ConfigError, match=match):
        build_model(_with(path, value))
