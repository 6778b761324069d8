"""A tiny experiment (timm's test_resnet, 32x48 images, a handful of samples) for fast engine tests."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from mtvision.config import Config, load_config

TINY = {
    "seed": 0,
    "data": {"dataset": "synthetic", "size": [32, 48], "num_train": 8, "num_val": 4, "batch_size": 4,
             "num_workers": 0, "tasks": ["seg", "depth", "normal"]},
    "model": {
        "backbone": {"name": "test_resnet", "pretrained": None},
        "neck": {"name": "fpn", "out_channels": 16},
        "heads": {"seg": {"name": "segmentation", "num_classes": 6, "channels": 16},
                  "depth": {"name": "depth", "channels": 16},
                  "normal": {"name": "normals", "channels": 16}},
    },
    "optimizer": {"name": "adamw", "lr": 3.0e-3},
    "schedule": {"name": "cosine", "warmup_iters": 0},
    "train": {"max_iters": 4, "eval_interval": 2, "checkpoint_interval": 2, "log_interval": 1,
              "device": "cpu", "grad_clip": 10.0},
}


def write_tiny_config(tmp_path: Path, name: str = "tiny.yaml") -> Path:
    """Write the tiny experiment as YAML (work dir inside ``tmp_path``); returns its path."""
    raw = {**TINY, "work_dir": str(tmp_path / "work")}
    path = Path(tmp_path) / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def tiny_config(tmp_path: Path, overrides=()) -> Config:
    """The tiny experiment as a Config, with ``key=value`` overrides."""
    return load_config(write_tiny_config(tmp_path), list(overrides))


def wait_for_file(path: Path, proc, timeout: float = 240.0) -> None:
    """Poll until ``path`` exists while the subprocess ``proc`` (a Popen) is still running."""
    t0 = time.time()
    while not Path(path).exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.02)
