"""Every YAML under configs/ loads, validates, and names a buildable balancer and consistent tasks; the
NYUv2 / Cityscapes protocol configs build their model and refuse to run without data.root."""

from pathlib import Path

import pytest
import torch

from mtvision.balancing import BALANCERS
from mtvision.config import ConfigError, config_to_dict, load_config
from mtvision.data import build_dataset
from mtvision.engine import check_tasks
from mtvision.models import DeepLabHead, build_model

ROOT = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(ROOT.rglob("*.yaml"))
BASES = {"base.yaml"}  # partial files meant to be included, not run
RUNNABLE = [p for p in CONFIGS if p.name not in BASES]
# The LibMTL / MTAN ResNet-50 protocols: dataset -> (size, num_classes, tasks of the multi-task config)
PROTOCOLS = {"nyuv2": ((288, 384), 13, ["seg", "depth", "normal"]), "cityscapes": ((128, 256), 7, ["seg", "depth"])}
PROTOCOL_CONFIGS = [p for p in RUNNABLE if p.relative_to(ROOT).parts[0] in PROTOCOLS]


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT).with_suffix(""))


@pytest.mark.parametrize("path", RUNNABLE, ids=_id)
def test_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert check_tasks(cfg)
    assert cfg.balancer.name in BALANCERS


def test_one_config_per_balancing_method():
    names = {p.stem for p in CONFIGS if p.parent.name == "balancing"}
    builtin = {n for n, cls in BALANCERS.items() if cls.__module__.startswith("mtvision.")}  # not a test's plugin
    assert builtin <= names
    assert {"mgda_rep", "pcgrad_rep", "upgrad_rep"} <= names


def test_protocol_configs_exist():
    names = {_id(p) for p in PROTOCOL_CONFIGS}
    assert {"nyuv2/mtl_ew", "nyuv2/stl_seg", "nyuv2/stl_depth", "nyuv2/stl_normal",
            "cityscapes/mtl_ew", "cityscapes/stl_seg", "cityscapes/stl_depth"} <= names


@pytest.mark.parametrize("path", PROTOCOL_CONFIGS, ids=_id)
def test_protocol_config_settings_and_root_required(path):
    cfg = load_config(path)
    size, num_classes, mtl_tasks = PROTOCOLS[cfg.data.dataset]
    assert tuple(cfg.data.size) == size and cfg.data.num_classes == num_classes
    assert set(cfg.data.tasks) <= set(mtl_tasks)
    if path.stem == "mtl_ew":
        assert cfg.data.tasks == mtl_tasks and cfg.balancer.name == "ew"
    assert cfg.model.backbone["name"] == "resnet50" and cfg.model.backbone["output_stride"] == 8
    assert cfg.model.backbone["pretrained"] is None  # a local file the user provides; never downloaded
    assert cfg.model.neck == {"name": "none"}
    assert all(h["name"].startswith("deeplab_") for h in cfg.model.heads.values())
    assert cfg.optimizer.lr == 1e-4
    # data.root is left for the user: building the data stops with an error naming the key.
    assert cfg.data.root is None
    with pytest.raises(ConfigError, match=r"data\.root"):
        build_dataset(cfg.data, "train", seed=cfg.seed)


@pytest.mark.parametrize("name", ["nyuv2/mtl_ew", "cityscapes/mtl_ew"])
def test_protocol_model_runs_on_a_small_random_input(name):
    cfg = load_config(ROOT / f"{name}.yaml")
    torch.manual_seed(0)
    model = build_model(config_to_dict(cfg.model)).eval()
    assert model.tasks == cfg.data.tasks and not model.has_neck
    assert model.backbone.strides == [4, 8] and model.backbone.out_channels == [256, 2048]
    assert all(isinstance(h, DeepLabHead) and h.decoder.aspp.atrous_rates == (12, 24, 36)
               for h in model.heads.values())
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))  # batch 1 in eval mode (BatchNorm running statistics)
    expected = {"seg": cfg.data.num_classes, "depth": 1, "normal": 3}
    assert {k: tuple(v.shape) for k, v in out.items()} == {t: (1, expected[t], 64, 64) for t in cfg.data.tasks}
    assert (out["depth"] > 0).all()


def test_coco_detection_config_builds_and_needs_data_root():
    cfg = load_config(ROOT / "coco" / "fcos_resnet50.yaml")
    assert check_tasks(cfg) == ["det"] and cfg.data.num_classes == 80 and cfg.data.root is None
    with pytest.raises(ConfigError, match=r"data\.root"):
        build_dataset(cfg.data, "train", seed=cfg.seed)
    torch.manual_seed(0)
    model = build_model(config_to_dict(cfg.model)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))["det"]
    assert model.heads["det"].strides == [8, 16, 32, 64, 128]  # FCOS's P3-P7
    assert out.shape == (1, 8 * 12 + 4 * 6 + 2 * 3 + 1 * 2 + 1 * 1, 80 + 8)
