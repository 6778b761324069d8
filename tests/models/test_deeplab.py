"""Dilated (output stride 8) backbones and the DeepLab heads, alone and in a model without a neck."""

import math

import pytest
import timm
import torch

from mtvision.config import ConfigError
from mtvision.models import (
    ASPP,
    BackboneError,
    DeepLabDepthHead,
    DeepLabNormalHead,
    DeepLabSegmentationHead,
    build_backbone,
    build_model,
)
from mtvision.ops import reference

# ---------------------------------------------------------------------------------------------------
# Output stride 8 backbones


@pytest.mark.parametrize("name, channels", [("resnet18", [64, 128, 256, 512]), ("resnet50", [256, 512, 1024, 2048])])
def test_output_stride_8_levels(name, channels):
    torch.manual_seed(0)
    bb = build_backbone(name, output_stride=8).eval()
    assert bb.strides == [4, 8, 8, 8] and bb.output_stride == 8
    assert bb.out_channels == channels
    h, w = 67, 93  # odd: sizes round up as in any CNN
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, h, w))
    for f, c, s in zip(feats, bb.out_channels, bb.strides):
        assert f.shape == (1, c, math.ceil(h / s), math.ceil(w / s))
    # Same parameters as the stride-32 network (dilation changes no weight shape).
    plain = build_backbone(name)
    assert [p.shape for p in bb.parameters()] == [p.shape for p in plain.parameters()]


def test_output_stride_8_dilates_the_last_two_stages_as_resnet_dilated():
    # LibMTL's resnet_dilated / torchvision's replace_stride_with_dilation: stage 3 keeps stride 8 with
    # dilation 2 (its first block dilation 1), stage 4 dilation 4 (its first block dilation 2).
    body = build_backbone("resnet50", output_stride=8).body

    def conv(stage, block):  # the bottleneck's 3x3
        return getattr(body, stage)[block].conv2

    assert conv("layer2", 0).stride == (2, 2)
    assert (conv("layer3", 0).stride, conv("layer3", 0).dilation) == ((1, 1), (1, 1))
    assert (conv("layer3", 1).stride, conv("layer3", 1).dilation) == ((1, 1), (2, 2))
    assert (conv("layer4", 0).stride, conv("layer4", 0).dilation) == ((1, 1), (2, 2))
    assert (conv("layer4", 2).stride, conv("layer4", 2).dilation) == ((1, 1), (4, 4))
    assert body.layer4[0].downsample[0].stride == (1, 1)


def test_output_stride_16_and_selected_levels():
    bb = build_backbone("resnet18", output_stride=16)
    assert bb.strides == [4, 8, 16, 16]
    bb = build_backbone("resnet18", output_stride=8, out_indices=[1, 4])
    assert bb.strides == [4, 8] and bb.out_channels == [64, 512]
    feats = bb(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 24), (8, 12)]


def test_output_stride_8_with_local_pretrained_weights(tmp_path):
    src = timm.create_model("resnet18")
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    bb = build_backbone("resnet18", pretrained=str(path), output_stride=8, out_indices=[1, 4])
    assert torch.equal(bb.body.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    assert bb.body.layer4[1].conv2.dilation == (4, 4) and bb.strides == [4, 8]


def test_output_stride_errors_name_the_key():
    with pytest.raises(BackboneError, match="expected null or one of 8, 16, 32, got 12") as e:
        build_backbone("resnet18", output_stride=12)
    assert e.value.key == "output_stride"
    with pytest.raises(BackboneError, match="VisionTransformer") as e:
        build_backbone("vit_tiny_patch16_224", output_stride=8)
    assert e.value.key == "output_stride"
    with pytest.raises(BackboneError, match="output_stride") as e:
        build_backbone("vgg11", output_stride=8)
    assert e.value.key == "output_stride"
    with pytest.raises(BackboneError, match="'output_stride' is set by mtvision") as e:
        build_backbone("resnet18", timm_kwargs={"output_stride": 8})
    assert e.value.key == "timm_kwargs"


# ---------------------------------------------------------------------------------------------------
# DeepLab heads on hand-made levels


def _levels(b=2, h=67, w=93, channels=(24, 40), strides=(4, 8)):
    return [torch.randn(b, c, math.ceil(h / s), math.ceil(w / s)) for c, s in zip(channels, strides)]


@pytest.mark.parametrize("low_level_channels", [48, None], ids=["v3plus", "v3"])
@pytest.mark.parametrize("size", [(67, 93), (33, 41), (64, 64)])
def test_heads_output_at_image_size(low_level_channels, size):
    torch.manual_seed(0)
    h, w = size
    feats = _levels(h=h, w=w)
    kw = dict(channels=16, low_level_channels=low_level_channels)
    seg = DeepLabSegmentationHead([24, 40], [4, 8], num_classes=13, **kw)
    dep = DeepLabDepthHead([24, 40], [4, 8], **kw)
    nor = DeepLabNormalHead([24, 40], [4, 8], **kw)
    assert seg(feats, (h, w)).shape == (2, 13, h, w)
    d = dep(feats, (h, w))
    assert d.shape == (2, 1, h, w) and (d > 0).all()
    n = nor(feats, (h, w))
    assert n.shape == (2, 3, h, w)
    assert not torch.allclose(n.norm(dim=1), torch.ones(2, h, w), atol=1e-3)  # raw, not normalised
    # The decoder works at the low-level resolution (V3+) or the ASPP one (V3).
    raw = seg.decoder(feats)
    assert raw.shape[-2:] == feats[0 if low_level_channels else 1].shape[-2:]


def test_layout_follows_libmtl_deeplabhead():
    head = DeepLabSegmentationHead([256, 2048], [4, 8], num_classes=13, low_level_channels=None)
    aspp = head.decoder.aspp
    assert isinstance(aspp, ASPP) and aspp.atrous_rates == (12, 24, 36)
    dilations = [b[0].dilation for b in aspp.branches[1:4]]
    assert dilations == [(12, 12), (24, 24), (36, 36)]
    assert all(isinstance(m, torch.nn.BatchNorm2d) for m in head.modules() if "Norm" in type(m).__name__)
    assert not hasattr(head.decoder, "project_low")
    # LibMTL's DeepLabHead(2048, 13): ASPP (5 branches, projection) + conv3x3-BN-ReLU + conv1x1, ~16.1M
    # parameters, seven BatchNorms.
    n = sum(p.numel() for p in head.parameters())
    assert n == 2048 * 256 * (1 + 27 + 1) + 1280 * 256 + 256 * 256 * 9 + 256 * 13 + 13 + 2 * 256 * 7
    plus = DeepLabSegmentationHead([256, 2048], [4, 8], num_classes=13)
    assert plus.decoder.project_low[0].out_channels == 48
    assert plus.decoder.head[0][0].in_channels == 256 + 48


def test_heads_on_fpn_levels_and_on_a_dilated_backbone_with_every_level():
    feats = _levels(channels=(16,) * 4, strides=(4, 8, 16, 32))
    head = DeepLabDepthHead(16, [4, 8, 16, 32], channels=8, atrous_rates=(6, 12, 18))
    assert head(feats, (67, 93)).shape == (2, 1, 67, 93)
    feats = _levels(channels=(8, 16, 24, 32), strides=(4, 8, 8, 8))
    head = DeepLabSegmentationHead([8, 16, 24, 32], [4, 8, 8, 8], num_classes=3, channels=8)
    assert head.decoder.low_level_index == 0
    assert head(feats, (67, 93)).shape == (2, 3, 67, 93)


def test_head_argument_errors():
    with pytest.raises(ValueError, match="low_level_stride 4 is not the stride of a level"):
        DeepLabSegmentationHead([40], [8], num_classes=3)
    DeepLabSegmentationHead([40], [8], num_classes=3, low_level_channels=None)  # plain V3: one level is enough
    with pytest.raises(ValueError, match="atrous_rates must be three positive ints"):
        DeepLabNormalHead([24, 40], [4, 8], atrous_rates=(6, 12))
    with pytest.raises(ValueError, match="num_classes"):
        DeepLabSegmentationHead([24, 40], [4, 8], num_classes=0)
    with pytest.raises(ValueError, match="max_depth"):
        DeepLabDepthHead([24, 40], [4, 8], max_depth=0.0)
    with pytest.raises(ValueError, match="dropout"):
        DeepLabDepthHead([24, 40], [4, 8], dropout=1.0)
    with pytest.raises(ValueError, match="expects 2 levels, got 1"):
        DeepLabNormalHead([24, 40], [4, 8], channels=8)(_levels()[:1], (67, 93))


def test_depth_head_bounds():
    head = DeepLabDepthHead([24, 40], [4, 8], channels=8, max_depth=10.0).eval()
    with torch.no_grad():
        head.decoder.head[-1].bias.fill_(1e4)
        d = head(_levels(), (67, 93))
    assert (d <= 10.0 + 1e-5).all() and (d > 9.9).all()


# ---------------------------------------------------------------------------------------------------
# The protocol model: dilated ResNet, no neck, one DeepLab head per task


def _deeplab_cfg(backbone="resnet18", low_level_channels=48, channels=32, **neck):
    common = dict(channels=channels, low_level_channels=low_level_channels)
    return {
        "backbone": {"name": backbone, "pretrained": None, "output_stride": 8, "out_indices": [1, 4]},
        "neck": {"name": "none", **neck},
        "heads": {"seg": {"name": "deeplab_segmentation", "num_classes": 13, **common},
                  "depth": {"name": "deeplab_depth", **common},
                  "normal": {"name": "deeplab_normals", **common}},
    }


def _targets(b, h, w, gen):
    return {"seg": torch.randint(0, 13, (b, h, w), generator=gen),
            "depth": torch.rand(b, 1, h, w, generator=gen) * 5 + 0.5,
            "normal": torch.nn.functional.normalize(torch.randn(b, 3, h, w, generator=gen), dim=1)}


def _losses(out, t):
    return reference.fused_dense_loss(out["seg"], t["seg"], out["depth"], t["depth"], out["normal"], t["normal"])


def test_model_without_neck_shapes_and_parameter_groups():
    model = build_model(_deeplab_cfg())
    assert not model.has_neck and isinstance(model.neck, torch.nn.Identity)
    assert list(model.neck.parameters()) == []
    out = model(torch.randn(2, 3, 67, 93))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "seg": (2, 13, 67, 93), "depth": (2, 1, 67, 93), "normal": (2, 3, 67, 93)}
    shared = list(model.shared_parameters())
    assert [id(p) for p in shared] == [id(p) for p in model.backbone.parameters()]
    groups = [shared] + [list(model.task_parameters(t)) for t in model.tasks]
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    # GradNorm's "last shared layer" without a neck: the backbone's last stage.
    assert [id(p) for p in model.last_shared_parameters()] == [id(p) for p in model.backbone.body.layer4.parameters()]
    # neck: null means no neck too (a Python dict; absent means the default FPN)
    assert not build_model({**_deeplab_cfg(), "neck": None}).has_neck
    with_fpn = build_model({k: v for k, v in _deeplab_cfg().items() if k != "neck"})
    assert with_fpn.has_neck and with_fpn(torch.randn(1, 3, 32, 32))["seg"].shape == (1, 13, 32, 32)


@pytest.mark.slow
def test_gradients_reach_every_backbone_parameter_from_each_task():
    torch.manual_seed(0)
    model = build_model(_deeplab_cfg()).train()
    gen = torch.Generator().manual_seed(0)
    images, t = torch.randn(2, 3, 32, 48), _targets(2, 32, 48, gen)
    losses = _losses(model(images), t)
    named = list(model.backbone.named_parameters())
    shared = [p for _, p in named]
    for i, task in enumerate(model.tasks):
        grads = torch.autograd.grad(losses[i], shared + list(model.task_parameters(task)), retain_graph=True,
                                    allow_unused=True)
        assert all(g is not None and torch.isfinite(g).all() for g in grads), task
        nonzero = {n for (n, _), g in zip(named, grads) if g.abs().sum() > 0}
        # timm zero-initialises each block's last BN scale, so at init the residual convs get no gradient
        # yet; that scale itself, in every block of every stage, does (so does the stem).
        last_bn = {n for n, _ in named if n.endswith("bn2.weight")}
        assert "body.conv1.weight" in nonzero and len(last_bn) == 8 and last_bn <= nonzero, task


@pytest.mark.parametrize("low_level_channels", [48, None], ids=["v3plus", "v3"])
def test_features_then_heads_equals_forward(low_level_channels):
    torch.manual_seed(0)
    model = build_model(_deeplab_cfg(low_level_channels=low_level_channels)).eval()
    x = torch.randn(1, 3, 67, 93)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert [tuple(f.shape[1:]) for f in feats] == [(64, 17, 24), (512, 9, 12)]
        split = model.forward_heads(feats, x.shape[-2:])
        full = model(x)
    for k in full:
        torch.testing.assert_close(split[k], full[k])


def test_representation_level_gradients_through_detached_features():
    """What representation-level balancing does: heads on detached copies of the shared features, per-task
    gradients w.r.t. those copies, one backward of a combination through the backbone."""
    torch.manual_seed(0)
    model = build_model(_deeplab_cfg()).train()
    images, t = torch.randn(2, 3, 32, 48), _targets(2, 32, 48, torch.Generator().manual_seed(1))
    feats = model.forward_features(images)
    inputs = [f.detach().requires_grad_() for f in feats]
    losses = _losses(model.forward_heads(inputs, images.shape[-2:]), t)
    per_task = [torch.autograd.grad(losses[i], inputs, retain_graph=True) for i in range(3)]
    assert all(g.shape == f.shape and g.abs().sum() > 0 for gs in per_task for g, f in zip(gs, feats))
    combined = [sum(gs[k] for gs in per_task) / 3 for k in range(len(feats))]
    torch.autograd.backward(feats, combined)
    assert all(p.grad is not None for p in model.shared_parameters())


@pytest.mark.slow
def test_tiny_training_steps_lower_the_loss_and_batch_one_works():
    torch.manual_seed(0)
    model = build_model(_deeplab_cfg(channels=16))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    images, t = torch.randn(2, 3, 32, 48), _targets(2, 32, 48, gen)
    first = None
    for _ in range(5):
        model.train()
        loss = _losses(model(images), t).sum()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first
    # Batch of one: evaluation (running statistics) and a training step (the ASPP pooling branch falls
    # back to running statistics instead of failing on a 1x1 map).
    model.eval()
    with torch.no_grad():
        out = model(images[:1])
    assert all(torch.isfinite(v).all() and v.shape[0] == 1 for v in out.values())
    model.train()
    loss = _losses(model(images[:1]), {k: v[:1] for k, v in t.items()}).sum()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_resnet50_protocol_model_builds_and_runs_at_64():
    torch.manual_seed(0)
    model = build_model(_deeplab_cfg("resnet50", low_level_channels=None, channels=256)).eval()
    assert model.backbone.out_channels == [256, 2048]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out["seg"].shape == (1, 13, 64, 64) and (out["depth"] > 0).all()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"neck": {"name": "none", "out_channels": 8}}, r"^model\.neck\.out_channels: unexpected argument"),
        ({"neck": {"name": "bifpn"}}, r"^model\.neck\.name: unknown neck 'bifpn' \(choose from: fpn, none\)"),
        ({"backbone": {"name": "resnet18", "output_stride": 12}}, r"^model\.backbone\.output_stride: "),
        ({"backbone": {"name": "vit_tiny_patch16_224", "output_stride": 8}}, r"^model\.backbone\.output_stride: "),
        ({"backbone": {"name": "resnet18", "output_stride": 8, "out_indices": [4]}},
         r"^model\.heads\.seg: invalid value .*low_level_stride 4 is not the stride of a level"),
    ],
)
def test_config_errors(change, match):
    with pytest.raises(ConfigError, match=match):
        build_model({**_deeplab_cfg(), **change})


@pytest.mark.parametrize("name, level", [("ew", "param"), ("mgda", "rep")])
def test_trainer_steps_with_the_protocol_layout(tmp_path, name, level):
    """The Trainer with a dilated backbone, no neck and DeepLab heads (timm's tiny test_resnet, synthetic
    scenes): a parameter-level and a representation-level step, evaluation included."""
    from mtvision.config import config_from_dict
    from mtvision.engine import Trainer

    raw = {
        "seed": 0, "work_dir": str(tmp_path / "work"),
        "data": {"dataset": "synthetic", "size": [32, 48], "num_train": 4, "num_val": 2, "batch_size": 2,
                 "num_workers": 0, "tasks": ["seg", "depth", "normal"]},
        "model": {
            "backbone": {"name": "test_resnet", "pretrained": None, "output_stride": 8, "out_indices": [1, 4]},
            "neck": {"name": "none"},
            "heads": {"seg": {"name": "deeplab_segmentation", "num_classes": 6, "channels": 16},
                      "depth": {"name": "deeplab_depth", "channels": 16, "low_level_channels": None},
                      "normal": {"name": "deeplab_normals", "channels": 16}},
        },
        "optimizer": {"name": "adamw", "lr": 1.0e-3},
        "train": {"max_iters": 2, "eval_interval": 2, "checkpoint_interval": 2, "log_interval": 1,
                  "device": "cpu"},
        "balancer": {"name": name, "level": level},
    }
    trainer = Trainer(config_from_dict(raw), console=False, progress=False)
    before = [p.detach().clone() for p in trainer.model.backbone.parameters()]
    metrics = trainer.train()
    assert math.isfinite(metrics["depth/abs_err"]) and math.isfinite(metrics["normal/mean"])
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.backbone.parameters()))
