"""Atomic checkpoint writes, weights_only loads and model/checkpoint mismatches."""

import pytest
import torch
from torch import nn

from mtvision.engine.checkpoint import CheckpointError, load_checkpoint, load_model_weights, save_checkpoint


def test_save_is_atomic_and_loads_weights_only(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    path = tmp_path / "ckpt" / "last.pth"
    save_checkpoint({"model": model.state_dict(), "iteration": 3, "metrics": {"seg/mIoU": 1.5}}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pth"]  # no temporary file left
    state = torch.load(path, weights_only=True)
    assert state["iteration"] == 3 and state["metrics"] == {"seg/mIoU": 1.5}

    # A failing write leaves the previous checkpoint intact and no temporary file behind.
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"model": {}, "iteration": 4}, path)
    monkeypatch.undo()
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pth"]
    assert load_checkpoint(path)["iteration"] == 3


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*bad.pth"):
        load_checkpoint(bad)
    torch.save({"weights": 1}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not an mtvision checkpoint"):
        load_checkpoint(tmp_path / "other.pth")


def test_model_weights_round_trip_and_mismatch(tmp_path):
    src, dst = nn.Linear(3, 2), nn.Linear(3, 2)
    save_checkpoint({"model": src.state_dict()}, tmp_path / "a.pth")
    load_model_weights(dst, tmp_path / "a.pth")
    assert torch.equal(src.weight, dst.weight)
    with pytest.raises(CheckpointError, match=r"does not match the model .*missing \['0.weight'"):
        load_model_weights(nn.Sequential(nn.Linear(3, 2)), tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_model_weights(nn.Linear(4, 2), tmp_path / "a.pth")
