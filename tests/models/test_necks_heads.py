"""FPN neck and the dense heads on hand-made feature lists."""

import pytest
import torch

from mtvision.models import DepthHead, FPNNeck, NormalHead, SegmentationHead, SemanticFPNDecoder

STRIDES = [4, 8, 16, 32]


def _levels(b=2, h=70, w=90, channels=(8, 16, 24, 32)):
    # Odd image size: level sizes are rounded up, as a CNN would.
    return [torch.randn(b, c, -(-h // s), -(-w // s)) for c, s in zip(channels, STRIDES)]


def test_fpn_levels_keep_sizes_and_strides():
    neck = FPNNeck([8, 16, 24, 32], out_channels=20)
    feats = _levels()
    out = neck(feats)
    assert neck.out_channels == 20 and neck.strides == STRIDES
    assert [tuple(o.shape) for o in out] == [(2, 20, *f.shape[-2:]) for f in feats]
    gn = FPNNeck([8, 16, 24, 32], out_channels=20, strides=STRIDES, norm="gn")
    assert any(isinstance(m, torch.nn.GroupNorm) for m in gn.modules())
    assert gn(feats)[0].shape == out[0].shape


def test_fpn_rejects_wrong_level_count_and_bad_args():
    neck = FPNNeck([8, 16, 24, 32])
    with pytest.raises(ValueError, match="expects 4 levels, got 3"):
        neck(_levels()[:3])
    with pytest.raises(ValueError, match="out_channels"):
        FPNNeck([8, 16], out_channels=0)
    with pytest.raises(ValueError, match="differ in length"):
        FPNNeck([8, 16], strides=[4, 8, 16])


def test_decoder_output_at_finest_level():
    dec = SemanticFPNDecoder(16, STRIDES, out_channels=5, channels=12)
    feats = _levels(channels=(16,) * 4)
    out = dec(feats)
    assert out.shape == (2, 5, 18, 23)
    # Blocks per level: 1, 1, 2, 3 (semantic FPN).
    assert [len(b) for b in dec.scale_heads] == [1, 1, 2, 3]
    with pytest.raises(ValueError, match="non-decreasing"):
        SemanticFPNDecoder(16, [4, 16, 8], out_channels=5)


def test_decoder_accepts_equal_strides_of_a_dilated_backbone():
    # output_stride 8: levels at strides 4, 8, 8, 8 (same size for the last three)
    feats = [torch.randn(2, 16, 18, 23)] + [torch.randn(2, 16, 9, 12) for _ in range(3)]
    dec = SemanticFPNDecoder(16, [4, 8, 8, 8], out_channels=5, channels=12)
    assert [len(b) for b in dec.scale_heads] == [1, 1, 1, 1]
    assert dec(feats).shape == (2, 5, 18, 23)
    head = SegmentationHead(16, [4, 8, 8, 8], num_classes=3, channels=12)
    assert head(feats, (70, 90)).shape == (2, 3, 70, 90)


def test_heads_at_image_resolution():
    feats = _levels(channels=(16,) * 4)
    seg = SegmentationHead(16, STRIDES, num_classes=7, channels=12)
    dep = DepthHead([16] * 4, STRIDES, channels=12)
    nor = NormalHead(16, STRIDES, channels=12)
    assert seg(feats, (70, 90)).shape == (2, 7, 70, 90)
    d = dep(feats, (70, 90))
    assert d.shape == (2, 1, 70, 90) and (d > 0).all()
    n = nor(feats, (70, 90))
    assert n.shape == (2, 3, 70, 90)
    # Raw vectors: not normalised inside the head.
    assert not torch.allclose(n.norm(dim=1), torch.ones(2, 70, 90), atol=1e-3)


def test_depth_activation_is_positive_and_bounded():
    feats = _levels(channels=(16,) * 4)
    dep = DepthHead(16, STRIDES, channels=12, min_depth=0.01)
    with torch.no_grad():
        dep.decoder.predict.bias.fill_(-1e4)  # softplus underflows to 0: min_depth keeps it positive
        d = dep(feats, (70, 90))
    assert torch.allclose(d, torch.full_like(d, 0.01))
    bounded = DepthHead(16, STRIDES, channels=12, max_depth=10.0)
    with torch.no_grad():
        bounded.decoder.predict.bias.fill_(1e4)
        d = bounded(feats, (35, 45))
    assert (d <= 10.0 + 1e-5).all() and (d > 9.9).all()
    with pytest.raises(ValueError, match="max_depth"):
        DepthHead(16, STRIDES, max_depth=0.0)
    with pytest.raises(ValueError, match="min_depth"):
        DepthHead(16, STRIDES, min_depth=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationHead(16, STRIDES, num_classes=0)
