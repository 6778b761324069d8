"""``model.backbone.pretrained: true``: timm's published weights through the Hugging Face hub cache.

Nothing here reaches the network. huggingface_hub reads ``HF_HUB_OFFLINE`` / ``HF_HOME`` / ``HF_HUB_CACHE``
when it is imported, so the hub checks run in a subprocess whose environment points every cache into
``tmp_path``, sets ``HF_HUB_OFFLINE=1`` and refuses sockets; the cache is filled here, as huggingface_hub
lays it out (``models--timm--<name>/refs/main`` holding a commit hash,
``models--timm--<name>/snapshots/<hash>/model.safetensors``).
The checks that need no hub run in this process with sockets refused.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import mtvision.models.backbones as backbones
from mtvision.config import ConfigError, config_from_dict, config_to_dict
from mtvision.engine.checkpoint import save_checkpoint
from mtvision.models import BackboneError, TimmCNNBackbone, build_backbone, build_model

from ..engine.helpers import TINY

ROOT = Path(__file__).resolve().parents[2]
CNN = "test_resnet.r160_in1k"  # hub repo timm/test_resnet.r160_in1k, ~0.5M parameters
VIT = "test_vit.r160_in1k"  # hub repo timm/test_vit.r160_in1k, 6 blocks of width 64, patch 16
COMMIT = "0123456789abcdef0123456789abcdef01234567"
NECK_HEADS = {"neck": {"name": "fpn", "out_channels": 16},
              "heads": {"depth": {"name": "depth", "channels": 16}}}

# Prepended to every subprocess: any connection attempt fails the check.
GUARD = """
import json, socket
def _refuse(*args, **kwargs):
    raise AssertionError("network access attempted")
socket.socket.connect = _refuse
socket.create_connection = _refuse
"""


def _hub_cache(tmp_path: Path) -> Path:
    return tmp_path / "hf" / "hub"


def _cached_file(tmp_path: Path, name: str) -> str:
    return str(_hub_cache(tmp_path) / f"models--timm--{name}" / "snapshots" / COMMIT / "model.safetensors")


def _fill_cache(tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    """Put a weights file of timm model ``name`` (random values, so that loading it shows) where
    huggingface_hub looks for ``timm/<name>``'s ``model.safetensors`` offline; returns its tensors."""
    assert timm.models.get_pretrained_cfg(name).hf_hub_id == f"timm/{name}"
    torch.manual_seed(1)
    sd = {k: (torch.randn_like(v) if v.is_floating_point() else v).contiguous()
          for k, v in timm.create_model(name).state_dict().items()}
    repo = _hub_cache(tmp_path) / f"models--timm--{name}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    save_file(sd, _cached_file(tmp_path, name))
    return sd


def _files(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _run(tmp_path: Path, code: str) -> dict:
    """Run ``code`` offline with every cache in ``tmp_path``; it prints one JSON line, returned."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k not in ("TRANSFORMERS_OFFLINE", "TORCH_HOME",
                                                                       "XDG_CACHE_HOME")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(_hub_cache(tmp_path)),
               TORCH_HOME=str(tmp_path / "torch"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", GUARD + code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def no_network(monkeypatch, refuse_sockets):
    """Sockets refused in this process, and huggingface_hub (if imported) in offline mode."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_cnn_pretrained_true_loads_the_cached_hub_weights(tmp_path):
    """build_model with pretrained: true gives a backbone holding exactly the cached file's tensors, read
    offline from the hub cache (which is left as it was)."""
    sd = _fill_cache(tmp_path, CNN)
    before = _files(tmp_path)
    cfg = {"backbone": {"name": CNN, "pretrained": True}, **NECK_HEADS}
    out = _run(tmp_path, f"""
import torch
from safetensors.torch import load_file
from mtvision.models import build_model
sd = load_file({_cached_file(tmp_path, CNN)!r})
model = build_model({cfg!r})
own = model.backbone.body.state_dict()
print(json.dumps({{"keys": len(own), "not_in_file": [k for k in own if k not in sd],
                  "differ": [k for k in own if k in sd and not torch.equal(own[k], sd[k])],
                  "cfg_keeps_state_dict": "state_dict" in model.backbone.body.pretrained_cfg}}))
""")
    assert out["keys"] > 50 and out["not_in_file"] == [] and out["differ"] == []
    assert not out["cfg_keeps_state_dict"]
    assert _files(tmp_path) == before  # nothing downloaded or written
    assert len(sd) > out["keys"]  # the file also holds the classifier, which the features model drops


def test_vit_pretrained_true_loads_the_cached_hub_weights(tmp_path):
    """A ViT backbone: the full model with the published weights, then pruned as always (blocks after
    the deepest one used, the final norm and the classifier removed)."""
    sd = _fill_cache(tmp_path, VIT)
    out = _run(tmp_path, f"""
import torch
from safetensors.torch import load_file
from mtvision.models import ViTBackbone, build_backbone
sd = load_file({_cached_file(tmp_path, VIT)!r})
bb = build_backbone({VIT!r}, pretrained=True, out_indices=[3])
own = bb.vit.state_dict()
print(json.dumps({{"vit": isinstance(bb, ViTBackbone), "blocks": len(bb.vit.blocks), "keys": len(own),
                  "not_in_file": [k for k in own if k not in sd],
                  "differ": [k for k in own if k in sd and not torch.equal(own[k], sd[k])]}}))
""")
    assert out["vit"] and out["blocks"] == 4
    assert out["keys"] > 20 and out["not_in_file"] == [] and out["differ"] == []
    assert "blocks.5.mlp.fc2.weight" in sd and "head.weight" in sd  # pruned away, not missing


def test_offline_without_the_file_says_how_to_get_it(tmp_path):
    """Offline with an empty cache: a ConfigError naming model.backbone.pretrained, the hub repo and file,
    the cache and the ways to get the file; nothing is downloaded. The same for a model timm has only a
    URL for (torch.hub's cache)."""
    cfg = {"backbone": {"name": CNN, "pretrained": True}, **NECK_HEADS}
    out = _run(tmp_path, f"""
from mtvision.config import ConfigError
from mtvision.models import BackboneError, build_backbone, build_model
try:
    build_model({cfg!r})
    model_error = None
except ConfigError as e:
    model_error = str(e)
try:
    build_backbone("legacy_seresnet18.in1k", pretrained=True)
    url_error = None
except BackboneError as e:
    url_error = [e.key, str(e)]
print(json.dumps({{"model_error": model_error, "url_error": url_error}}))
""")
    msg = out["model_error"]
    assert msg is not None and msg.startswith("model.backbone.pretrained: ")
    for part in (repr(CNN), f"'timm/{CNN}'", "model.safetensors", "HF_HUB_OFFLINE=1",
                 str(_hub_cache(tmp_path)), f"HF_HOME={tmp_path / 'hf'}", "run once with network access",
                 f"download timm/{CNN} model.safetensors", "set model.backbone.pretrained to the local file"):
        assert part in msg, (part, msg)
    assert "`hf download " in msg or "`huggingface-cli download " in msg
    key, url_msg = out["url_error"]
    url = timm.models.get_pretrained_cfg("legacy_seresnet18.in1k").url
    assert key == "pretrained" and url and url in url_msg and "HF_HUB_OFFLINE=1" in url_msg
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in url_msg
    assert _files(tmp_path / "hf") == [] and _files(tmp_path / "torch") == []


def test_download_failure_names_the_repo_and_how_to_get_the_file(monkeypatch, no_network):
    """Online, a failed hub request (here a stand-in for hf_hub_download) is a BackboneError with the repo,
    the file, the cause and the ways to get the file, not the client's exception."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    asked = []

    def unreachable(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        raise LocalEntryNotFoundError("cannot reach the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(BackboneError) as e:
        build_backbone(CNN, pretrained=True)
    assert e.value.key == "pretrained"
    msg = str(e.value)
    assert "cannot reach the hub" in msg and f"'timm/{CNN}'" in msg and constants.HF_HUB_CACHE in msg
    assert "run once with network access" in msg and "local file" in msg
    assert asked == [(f"timm/{CNN}", "model.safetensors"), (f"timm/{CNN}", "pytorch_model.bin")]

    def broken(repo_id, filename, **kwargs):
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", broken)
    with pytest.raises(BackboneError, match=r"download failed \(ConnectionResetError: connection reset"):
        build_backbone(CNN, pretrained=True)


@pytest.mark.parametrize("name", ["resnetblur18", "coatnet_nano_cc_224"])
def test_model_without_published_weights_is_a_clear_error(name, no_network):
    assert not timm.list_pretrained(f"{timm.models.get_arch_name(name)}.*")
    with pytest.raises(BackboneError) as e:
        build_backbone(name, pretrained=True)
    assert e.value.key == "pretrained"
    msg = str(e.value)
    assert f"timm model {name!r} has no published pretrained weights" in msg
    assert "local weights file" in msg and "null for random init" in msg
    with pytest.raises(ConfigError, match=r"^model\.backbone\.pretrained: timm model .* has no published"):
        build_model({"backbone": {"name": name, "pretrained": True}, **NECK_HEADS})


def test_pretrained_false_is_random_init(no_network, monkeypatch):
    """false is null: random weights, nothing fetched (the hub function is never called)."""

    def fetch(name):
        raise AssertionError(f"published weights fetched for {name}")

    monkeypatch.setattr(backbones, "_published_state_dict", fetch)
    states = []
    for pretrained in (False, None):
        torch.manual_seed(0)
        model = build_model({"backbone": {"name": CNN, "pretrained": pretrained}, **NECK_HEADS})
        assert isinstance(model.backbone, TimmCNNBackbone)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    torch.manual_seed(0)
    vit = build_backbone(VIT, pretrained=False)
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(vit.state_dict().values(),
                                                 build_backbone(VIT).state_dict().values()))
    with pytest.raises(BackboneError, match="expected null, true .* or a file path, got 1"):
        build_backbone(CNN, pretrained=1)


def test_checkpoint_tool_does_not_fetch_published_weights(tmp_path, no_network, monkeypatch):
    """A tool that evaluates a checkpoint (tools/eval.py, predict, export: engine.cli.load_trained_model)
    trained with pretrained: true builds the model without the published weights (the checkpoint holds
    every weight), so it runs offline without them."""
    from mtvision.engine.cli import config_for_checkpoint, load_trained_model

    def fetch(name):
        raise AssertionError(f"published weights fetched for {name}")

    monkeypatch.setattr(backbones, "_published_state_dict", fetch)
    raw = copy.deepcopy(TINY)
    raw["model"]["backbone"] = {"name": "test_resnet", "pretrained": True}
    assert timm.models.get_pretrained_cfg("test_resnet").hf_hub_id  # true would download
    cfg = config_from_dict(raw)
    model_cfg = config_to_dict(cfg.model)
    model_cfg["backbone"]["pretrained"] = None  # the trained weights: drawn here
    torch.manual_seed(3)
    trained = build_model(model_cfg)
    path = save_checkpoint({"model": trained.state_dict(), "config": config_to_dict(cfg), "iteration": 0},
                           tmp_path / "ckpt.pth")
    cfg, _ = config_for_checkpoint(path)
    assert cfg.model.backbone["pretrained"] is True
    model, _, _ = load_trained_model(cfg, str(path))
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in trained.state_dict().items())
