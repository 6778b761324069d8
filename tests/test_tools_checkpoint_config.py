"""The checkpoint tools (eval, predict, export_onnx) build the model and the validation data from the config
stored in the checkpoint; CONFIG and the key=value overrides apply on top of it."""

import json

import cv2
import pytest
import torch
import yaml

from mtvision.engine.checkpoint import load_checkpoint
from mtvision.engine.visualize import LABEL_HEIGHT

from .engine.helpers import TINY
from .test_tools import _tool

# trained at another size and on fewer validation images than the tiny config says (32x48, 4 images)
RUN = ["data.size=[48, 64]", "data.num_val=3", "train.max_iters=2", "train.eval_interval=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``(config, work dir)`` of a tiny run trained with data overrides the config file does not hold."""
    from .engine.helpers import write_tiny_config

    tmp = tmp_path_factory.mktemp("ckpt_config")
    config = write_tiny_config(tmp)
    assert _tool("train").main([str(config), "--no-progress", *RUN]) == 0
    return config, tmp / "work"


def _eval(argv, tmp_path, name="eval.json"):
    out = tmp_path / name
    rc = _tool("eval").main([*argv, "--out", str(out)])
    return rc, (json.loads(out.read_text()) if rc == 0 else None)


def _same_metrics(result, final):
    assert result["metrics"].keys() == final.keys()
    for k, v in final.items():
        if v is None:
            assert result["metrics"][k] is None, k
        else:
            assert result["metrics"][k] == pytest.approx(v, rel=1e-6, abs=1e-6), k


def test_eval_with_the_plain_config_evaluates_the_run_as_trained(run, tmp_path, capsys):
    config, work = run
    final = json.loads((work / "metrics.json").read_text())["final"]
    rc, result = _eval([str(config), "--checkpoint", str(work / "checkpoints" / "last.pth")], tmp_path)
    assert rc == 0
    # the trainer's final evaluation: 3 images at 48x64, not the config file's 4 at 32x48
    assert result["num_samples"] == 3
    _same_metrics(result, final)
    (note,) = [line for line in capsys.readouterr().out.splitlines() if "from the checkpoint" in line]
    assert note.startswith(f"settings from the checkpoint {work / 'checkpoints' / 'last.pth'}: model, ")
    assert "data.size, " in note and "data.num_val, " in note and "data.tasks, " in note
    assert note.endswith(f"differing from {config}: data.size [48, 64] (not [32, 48]), "
                         f"data.num_val 3 (not 4)")


def test_config_may_be_left_out(run, tmp_path, capsys):
    _, work = run
    final = json.loads((work / "metrics.json").read_text())["final"]
    ckpt = str(work / "checkpoints" / "last.pth")
    rc, result = _eval(["--checkpoint", ckpt], tmp_path)
    assert rc == 0 and result["num_samples"] == 3
    _same_metrics(result, final)
    assert f"config: the one stored in {ckpt}\n" in capsys.readouterr().out
    # an override standing where CONFIG would is an override
    rc, result = _eval(["data.num_val=2", "--checkpoint", ckpt], tmp_path)
    assert rc == 0 and result["num_samples"] == 2
    assert f"config: the one stored in {ckpt}, with data.num_val=2\n" in capsys.readouterr().out


def test_data_overrides_win_over_the_checkpoint(run, tmp_path, capsys):
    config, work = run
    ckpt = str(work / "checkpoints" / "last.pth")
    rc, result = _eval([str(config), "--checkpoint", ckpt, "data.num_val=2"], tmp_path)
    assert rc == 0 and result["num_samples"] == 2
    note = capsys.readouterr().out
    assert "data.num_val" not in note and "data.size [48, 64] (not [32, 48])" in note
    # evaluating at another size on purpose: predict draws panels of the size asked for
    out = tmp_path / "pics"
    assert _tool("predict").main([str(config), "--checkpoint", ckpt, "--out", str(out), "--num", "1",
                                  "data.size=[32, 64]"]) == 0
    assert cv2.imread(str(out / "0000.png")).shape == (32 + LABEL_HEIGHT, 7 * 64, 3)


def test_predict_with_the_plain_config_draws_at_the_trained_size(run, tmp_path):
    config, work = run
    out = tmp_path / "pics"
    assert _tool("predict").main([str(config), "--checkpoint", str(work / "checkpoints" / "best.pth"),
                                  "--out", str(out), "--num", "1"]) == 0
    assert cv2.imread(str(out / "0000.png")).shape == (48 + LABEL_HEIGHT, 7 * 64, 3)


def test_a_model_key_against_the_checkpoint_is_an_error(run, tmp_path, capsys):
    config, work = run
    ckpt = str(work / "checkpoints" / "last.pth")
    rc = _tool("eval").main([str(config), "--checkpoint", ckpt, "model.heads.seg.num_classes=7"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("error: model.heads.seg.num_classes: the checkpoint was trained with 6, "
                          "the config/override says 7")
    # the same from a config file
    other = {**TINY, "model": {**TINY["model"], "neck": {"name": "fpn", "out_channels": 8}}}
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(other))
    assert _tool("predict").main([str(path), "--checkpoint", ckpt, "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err.startswith(
        "error: model.neck.out_channels: the checkpoint was trained with 16, the config/override says 8")
    # an override that agrees with the checkpoint is fine
    rc, _ = _eval([str(config), "--checkpoint", ckpt, "model.heads.seg.num_classes=6"], tmp_path)
    assert rc == 0


def test_the_pretrained_file_of_training_is_not_needed(run, tmp_path):
    _, work = run
    state = load_checkpoint(work / "checkpoints" / "last.pth")
    state["config"]["model"]["backbone"]["pretrained"] = str(tmp_path / "gone.pth")
    ckpt = tmp_path / "moved.pth"
    torch.save(state, ckpt)
    rc, result = _eval(["--checkpoint", str(ckpt)], tmp_path)
    assert rc == 0 and result["num_samples"] == 3


def test_a_checkpoint_without_a_config_uses_the_file(run, tmp_path, capsys):
    config, work = run
    state = load_checkpoint(work / "checkpoints" / "last.pth")
    del state["config"]
    ckpt = tmp_path / "old.pth"
    torch.save(state, ckpt)
    rc, result = _eval([str(config), "--checkpoint", str(ckpt)], tmp_path)
    assert rc == 0 and result["num_samples"] == 4  # the config file's validation set
    assert f"{ckpt} stores no config: using {config} as it is" in capsys.readouterr().out
    assert _tool("eval").main(["--checkpoint", str(ckpt)]) == 2
    assert capsys.readouterr().err == (f"error: {ckpt} stores no config (a checkpoint of an older "
                                       f"mtvision): give CONFIG\n")


def test_custom_imports_come_from_the_checkpoint(run, tmp_path, monkeypatch, capsys):
    _, work = run
    plugin = tmp_path / "plugins"
    plugin.mkdir()
    marker = tmp_path / "imported"
    (plugin / "mtv_ckpt_plugin.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(plugin))
    state = load_checkpoint(work / "checkpoints" / "last.pth")
    state["config"]["custom_imports"] = ["mtv_ckpt_plugin"]
    ckpt = tmp_path / "plugin.pth"
    torch.save(state, ckpt)
    config, _ = run
    rc, _ = _eval([str(config), "--checkpoint", str(ckpt)], tmp_path)
    assert rc == 0 and marker.is_file()
    assert "model, custom_imports, data." in capsys.readouterr().out
