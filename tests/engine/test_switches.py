"""Precision and speed switches (channels_last, bf16 autocast, torch.compile) and bad-data handling in
the training loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mtvision.config import ConfigError
from mtvision.data.sample import DataError
from mtvision.engine import Trainer
from mtvision.engine.builders import check_train_switches

from ..data.fixtures import encode_normals_png, write_gray_png, write_rgb_png
from .helpers import tiny_config

# SGD: Adam turns float rounding in near-zero gradients into full-size steps, hiding real differences
STEPS = ["train.max_iters=2", "train.eval_interval=2", "train.checkpoint_interval=2", "optimizer.name=sgd",
         "optimizer.lr=0.01"]


def _train(tmp_path, name, overrides=()):
    t = Trainer(tiny_config(tmp_path, [*STEPS, f"work_dir={tmp_path / name}", *overrides]), console=False,
                progress=False)
    t.train()
    return t


def _max_diff(a: Trainer, b: Trainer) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.model.parameters(), b.model.parameters()))


@pytest.mark.parametrize("method", ["ew", "mgda"])
def test_channels_last_trains_the_same_model(tmp_path, method):
    ref = _train(tmp_path, "ref", [f"balancer.name={method}"])
    nhwc = _train(tmp_path, "nhwc", [f"balancer.name={method}", "train.channels_last=true"])
    conv = nhwc.model.backbone.body.conv1[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert nhwc.skipped_steps == 0 and _max_diff(ref, nhwc) < 1e-4


@pytest.mark.slow
def test_bf16_autocast_trains(tmp_path):
    t = _train(tmp_path, "bf16", ["train.amp=bf16", "balancer.name=pcgrad"])
    assert t.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


@pytest.mark.slow
def test_compiled_model_matches_eager(tmp_path):
    # rep-level MGDA: several backward passes through the compiled graph (retain_graph)
    over = ["balancer.name=mgda", "balancer.level=rep"]
    ref = _train(tmp_path, "eager", over)
    compiled = _train(tmp_path, "compiled", [*over, "train.compile=true"])
    assert compiled.skipped_steps == 0 and _max_diff(ref, compiled) < 1e-3
    assert list(compiled.model.state_dict()) == list(ref.model.state_dict())  # no _orig_mod. prefixes


def test_sync_bn_on_cpu_with_several_processes_is_a_config_error(tmp_path):
    cfg = tiny_config(tmp_path, ["train.sync_bn=true"])
    check_train_switches(cfg.train, torch.device("cpu"), 1)  # one process: nothing to synchronise
    with pytest.raises(ConfigError, match="train.sync_bn"):
        check_train_switches(cfg.train, torch.device("cpu"), 2)


def _custom_data(tmp_path: Path, corrupt: bool) -> list[str]:
    """A custom-layout folder of 8 training and 2 validation 32x48 scenes (images and seg/depth/normal
    maps in the documented formats); with ``corrupt``, one image is not a PNG and one seg map is missing."""
    root = tmp_path / "custom"
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        for i in range(n):
            base = root / split
            write_rgb_png(base / "images" / f"s{i}.png", rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
            write_gray_png(base / "seg" / f"s{i}.png", rng.integers(0, 6, (32, 48), dtype=np.uint8))
            write_gray_png(base / "depth" / f"s{i}.png", rng.integers(500, 5000, (32, 48), dtype=np.uint16))
            n_xyz = rng.normal(size=(32, 48, 3))
            n_xyz /= np.linalg.norm(n_xyz, axis=-1, keepdims=True)
            write_rgb_png(base / "normal" / f"s{i}.png", encode_normals_png(n_xyz))
    if corrupt:
        (root / "train" / "images" / "s3.png").write_bytes(b"not a png")
        (root / "train" / "seg" / "s5.png").unlink()
    return ["data.dataset=custom", f"data.root={root}", "data.num_classes=6"]


@pytest.mark.slow
def test_bad_samples_stop_with_the_file_named_or_are_skipped_and_counted(tmp_path):
    data = _custom_data(tmp_path, corrupt=True)
    # data.check (on by default for file datasets) names both before the first step
    with pytest.raises(DataError, match=r"2 unreadable sample\(s\) found before training: .*s3\.png: image.*s5\.png"):
        Trainer(tiny_config(tmp_path, [*STEPS, f"work_dir={tmp_path / 'strict'}", *data]), console=False,
                progress=False)
    t = Trainer(tiny_config(tmp_path, [*STEPS, f"work_dir={tmp_path / 'late'}", *data, "data.check=false"]),
                console=False, progress=False)
    with pytest.raises(DataError, match=r"(s3\.png: image|s5\.png)"):
        t.train()

    t = _train(tmp_path, "skip", [*data, "data.skip_bad=true", "train.max_iters=4"])
    # 2 epochs of 8 samples: each bad sample is dropped (and counted) every time it comes up
    assert t.iteration == 4 and t.skipped_samples == 4 and t.skipped_steps == 0
    log = (tmp_path / "skip" / "train.log").read_text()
    assert "skipped samples 4" in log
