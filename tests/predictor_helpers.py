"""A tiny 4-task model (seg, depth, normal, FCOS det; timm's test_resnet, 16-channel FPN and heads) saved as
a checkpoint that stores its config, for the Predictor, predict-tool and ONNX post-processing tests."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mtvision.config import config_from_dict, config_to_dict
from mtvision.engine.checkpoint import save_checkpoint
from mtvision.models import build_model

from .engine.helpers import TINY


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread while a module's tests run: on a small shared machine two threads of tiny convs
    wait on each other far longer than they compute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: The network input of the tiny run (H, W).
SIZE = (64, 96)


def tiny_det_config(keep_ratio: bool = False):
    """TINY with a detection head, at 64x96."""
    raw = copy.deepcopy(TINY)
    raw["data"].update(size=list(SIZE), tasks=["seg", "depth", "normal", "det"], keep_ratio=keep_ratio,
                       batch_size=4)
    raw["model"]["heads"]["det"] = {"name": "fcos", "num_classes": 6, "channels": 16, "num_convs": 1}
    return config_from_dict(raw)


def tiny_det_model(cfg) -> torch.nn.Module:
    """The config's model with weights drawn so that its predictions vary over the image: detection scores
    spread (no near-ties for NMS to order differently), several classes."""
    torch.manual_seed(0)
    model = build_model(config_to_dict(cfg.model)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        head = model.heads["det"]
        for conv in (head.cls_logits, head.centerness, head.box_pred):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
        seg = model.heads["seg"].decoder.predict
        seg.weight.mul_(20.0)
    return model


def write_checkpoint(path: Path, keep_ratio: bool = False) -> Path:
    """A checkpoint of the tiny 4-task model that stores its config, as tools/train.py writes one."""
    cfg = tiny_det_config(keep_ratio)
    model = tiny_det_model(cfg)
    return save_checkpoint({"model": model.state_dict(), "config": config_to_dict(cfg), "iteration": 0}, path)


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An RGB uint8 image of blobs (random noise, blurred): regions and edges, not pixel noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, h // 12), max(2, w // 12), 3)).astype(np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def load_tool(name: str):
    """``tools/<name>.py`` as a module (its ``main(argv)`` returns the exit status)."""
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"mtv_tool_{name}_inference_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
