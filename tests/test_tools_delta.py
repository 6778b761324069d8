"""Δm tooling (tools/delta.py, tools/eval.py --baselines) and tools/eval.py --cityscapes-export end to end."""

import json
import subprocess

import pytest
import yaml

from mtvision.evaluation import DELTA_M_METRICS, delta_m, read_baselines, read_metrics

from .data.cityscapes_fixture import write_cityscapes
from .engine.helpers import TINY
from .test_tools import _tool, trained  # noqa: F401 - the shared tiny training run (a fixture)

BASE = {"seg/mIoU": 50.0, "seg/pixAcc": 80.0, "depth/abs_err": 0.5, "depth/rel_err": 0.2}


def write(path, obj):
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture
def files(tmp_path):
    """Baselines in the three accepted formats, and two results files."""
    stl_seg = write(tmp_path / "stl_seg.json",  # a tools/train.py metrics.json
                    {"final": {"seg/mIoU": 50.0, "seg/pixAcc": 80.0, "seg/IoU/road": None, "seg/loss": 1.0},
                     "history": [], "best": {}})
    stl_depth = write(tmp_path / "stl_depth.json",  # a tools/eval.py --out file
                      {"checkpoint": "x.pth", "iteration": 3,
                       "metrics": {"depth/abs_err": 0.5, "depth/rel_err": 0.2, "depth/rmse": 0.9}})
    plain = write(tmp_path / "published.json", {"seg/mIoU": 50.0, "depth/abs_err": 0.5})
    better = write(tmp_path / "mtl_a.json", {"final": {"seg/mIoU": 55.0, "seg/pixAcc": 88.0,
                                                       "depth/abs_err": 0.4, "depth/rel_err": 0.2}})
    partial = write(tmp_path / "mtl_b.json", {"metrics": {"seg/mIoU": 45.0}})
    return {"stl": [stl_seg, stl_depth], "plain": plain, "better": better, "partial": partial}


def test_read_baselines_formats(files):
    assert read_baselines(files["stl"]) == BASE  # run files: the standard Δm metrics only
    assert read_baselines(files["plain"]) == {"seg/mIoU": 50.0, "depth/abs_err": 0.5}  # every key listed
    assert read_baselines(files["stl"], metrics=["seg/mIoU", "depth/rmse"]) == {"seg/mIoU": 50.0,
                                                                                "depth/rmse": 0.9}
    assert read_metrics(files["better"])["seg/pixAcc"] == 88.0
    assert "depth/abs_err" in DELTA_M_METRICS and "normal/within_30" in DELTA_M_METRICS


def test_read_baselines_errors(files, tmp_path):
    conflict = write(tmp_path / "other.json", {"seg/mIoU": 51.0})
    with pytest.raises(ValueError, match="'seg/mIoU' differs between .*stl_seg.json .*other.json"):
        read_baselines([*files["stl"], conflict])
    with pytest.raises(ValueError, match=r"baseline metric\(s\) \['normal/mean'\] not found"):
        read_baselines(files["stl"], metrics=["seg/mIoU", "normal/mean"])
    empty = write(tmp_path / "empty.json", {"final": {"seg/loss": 1.0}})
    with pytest.raises(ValueError, match="empty.json: none of the metrics"):
        read_baselines([empty])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        read_baselines([tmp_path / "bad.json"])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_baselines([tmp_path / "nope.json"])


def test_delta_tool_table(files, tmp_path, capsys):
    out = tmp_path / "table.md"
    rc = _tool("delta").main([str(files["better"]), "--baselines", *map(str, files["stl"]),
                              "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0] == "| results | seg/mIoU ↑ | seg/pixAcc ↑ | depth/abs_err ↓ | depth/rel_err ↓ | Δm % ↓ |"
    assert lines[2] == "| baselines | 50 | 80 | 0.5 | 0.2 | 0.00 |"
    # mIoU +10% (-10), pixAcc +10% (-10), abs_err -20% (-20), rel_err = (0): Δm = -10
    assert lines[3] == (f"| {files['better']} | 55 (-10.00) | 88 (-10.00) | 0.4 (-20.00) | 0.2 (+0.00) "
                        f"| -10.00 |")
    assert lines[5].startswith("Cells: value (relative change in %, signed as in Δm")
    assert out.read_text() == "\n".join(lines[:6]) + "\n"
    assert delta_m(read_metrics(files["better"]), BASE) == pytest.approx(-10.0)


def test_delta_tool_warns_of_a_task_without_baseline(files, tmp_path, capsys):
    three = write(tmp_path / "mtl_c.json", {"final": {"seg/mIoU": 55.0, "depth/abs_err": 0.4,
                                                      "normal/mean": 20.0, "normal/median": 15.0}})
    rc = _tool("delta").main([str(files["better"]), str(three), "--baselines", str(files["plain"])])
    captured = capsys.readouterr()
    assert rc == 0
    assert captured.err == (f"warning: no baseline metric of task 'normal' in {files['plain']} (reported by "
                            f"{three}); Δm leaves it out\n")
    # keys picked with --metrics leave tasks out on purpose
    rc = _tool("delta").main([str(three), "--baselines", str(files["plain"]), "--metrics", "seg/mIoU"])
    assert rc == 0 and capsys.readouterr().err == ""


def test_delta_table_continues_an_interrupted_run(tmp_path, monkeypatch):
    """tools/train.py refuses a work dir holding checkpoints unless told what to do: the table's runs
    continue them."""
    delta_table = _tool("delta_table")
    commands = []
    monkeypatch.setattr(delta_table.subprocess, "run",
                        lambda cmd, **kw: commands.append(cmd) or subprocess.CompletedProcess(cmd, 1))
    assert delta_table.train(delta_table.BASELINES["seg"], tmp_path / "stl_seg" / "seed0", []) is None
    (cmd,) = commands
    assert cmd[1].endswith("tools/train.py") and "--resume" in cmd


def test_delta_tool_row_without_a_metric_and_bad_files(files, capsys):
    rc = _tool("delta").main([str(files["better"]), str(files["partial"]),
                              "--baselines", str(files["plain"])])
    captured = capsys.readouterr()
    assert rc == 1 and "no Δm for" in captured.err and str(files["partial"]) in captured.err
    (row,) = [line for line in captured.out.splitlines() if line.startswith(f"| {files['partial']}")]
    assert row.startswith(f"| {files['partial']} | 45 | — |")
    assert "metric 'depth/abs_err' is in baselines but missing from results" in row
    missing = str(files["better"].parent / "missing.json")
    rc = _tool("delta").main([str(files["better"]), "--baselines", missing])
    assert rc == 2 and "metrics file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_with_baselines(trained, tmp_path, capsys):
    config, work = trained
    summary = json.loads((work / "metrics.json").read_text())["final"]
    base = {"seg/mIoU": summary["seg/mIoU"] * 2, "normal/mean": summary["normal/mean"] * 2}
    out = tmp_path / "eval.json"
    rc = _tool("eval").main([str(config), "--checkpoint", str(work / "checkpoints" / "last.pth"),
                             "--baselines", str(write(tmp_path / "base.json", base)), "--out", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    # mIoU half the baseline's: +50; normal mean half: -50; Δm 0
    assert "Δm = +0.00 %" in captured.out and "change % (Δm sign)" in captured.out
    # depth, a task of the run, has no baseline: named, not silently left out of Δm
    assert [line for line in captured.err.splitlines() if line.startswith("warning")] == [
        f"warning: --baselines: no baseline metric of task 'depth' in {tmp_path / 'base.json'}; "
        f"Δm leaves it out"]
    result = json.loads(out.read_text())
    assert result["relative_changes"] == pytest.approx({"seg/mIoU": 50.0, "normal/mean": -50.0})
    assert result["delta_m"] == pytest.approx(0.0, abs=1e-9)
    # baselines taken from the run's own metrics.json: Δm 0 over the standard metrics it reports
    rc = _tool("eval").main([str(config), "--checkpoint", str(work / "checkpoints" / "last.pth"),
                             "--baselines", str(work / "metrics.json"), "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert list(result["relative_changes"]) == [k for k in DELTA_M_METRICS if summary.get(k) is not None]
    assert result["delta_m"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_eval_baselines_errors(trained, tmp_path, capsys):
    config, work = trained
    ckpt = str(work / "checkpoints" / "last.pth")
    rc = _tool("eval").main([str(config), "--checkpoint", ckpt, "--baselines", str(tmp_path / "none.json")])
    assert rc == 2 and "metrics file not found" in capsys.readouterr().err
    base = write(tmp_path / "b.json", {"detection/AP": 30.0})
    rc = _tool("eval").main([str(config), "--checkpoint", ckpt, "--baselines", str(base)])
    assert rc == 2 and "'detection/AP' is in baselines but missing from results" in capsys.readouterr().err
    rc = _tool("eval").main([str(config), "--checkpoint", ckpt, "--cityscapes-export", str(tmp_path / "cs")])
    assert rc == 2 and "needs data.dataset=cityscapes" in capsys.readouterr().err
    rc = _tool("eval").main([str(config), "--checkpoint", ckpt, "--cityscapes-export", str(tmp_path / "cs"),
                             "data.dataset=cityscapes", "data.num_classes=19", "data.tasks=[seg]",
                             "data.keep_ratio=true"])
    assert rc == 2 and "with data.keep_ratio the logits hold padding" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_cityscapes_export_matches_the_official_script(tmp_path, capsys):
    """Train 2 iterations on a Cityscapes fixture at its own size, so tools/eval.py's mIoU (at the config's
    size) is at full resolution too and must equal the official script's on the exported folder."""
    from mtvision.evaluation.cityscapes_export import official_evaluation

    root = tmp_path / "cityscapes"
    for split in ("train", "val"):
        write_cityscapes(root, split, seed={"train": 0, "val": 1}[split])
    raw = {**TINY, "work_dir": str(tmp_path / "work")}
    raw["data"] = {**TINY["data"], "dataset": "cityscapes", "root": str(root), "size": [32, 64],
                   "num_classes": 19, "tasks": ["seg", "depth"], "batch_size": 2}
    heads = {"seg": {"name": "segmentation", "num_classes": 19, "channels": 16},
             "depth": {"name": "depth", "channels": 16}}
    raw["model"] = {**TINY["model"], "heads": heads}
    config = tmp_path / "cs.yaml"
    config.write_text(yaml.safe_dump(raw))
    argv = [str(config), "--no-progress", "train.max_iters=2", "train.eval_interval=2"]
    assert _tool("train").main(argv) == 0
    ckpt = str(tmp_path / "work" / "checkpoints" / "last.pth")
    export, out = tmp_path / "export", tmp_path / "eval.json"
    rc = _tool("eval").main([str(config), "--checkpoint", ckpt, "--cityscapes-export", str(export),
                             "--out", str(out)])
    assert rc == 0
    assert "wrote 3 Cityscapes result PNGs" in capsys.readouterr().out
    assert sorted(p.name for p in export.iterdir()) == ["aachen_000000_000019_pred.png",
                                                        "aachen_000001_000020_pred.png",
                                                        "bochum_000000_000019_pred.png"]
    ours = json.loads(out.read_text())["metrics"]["seg/mIoU"]
    assert 100.0 * official_evaluation(root, export)["averageScoreClasses"] == pytest.approx(ours, rel=1e-9)
    rc = _tool("eval").main([str(config), "--checkpoint", ckpt, "--cityscapes-export", str(export),
                             "data.num_classes=7"])
    assert rc == 2 and "data.num_classes is 7" in capsys.readouterr().err


def test_delta_leaves_out_the_auxiliary_tasks_a_run_records(files, tmp_path, capsys):
    """A run that trained depth as an auxiliary task (its metrics.json says so): Δm over seg only, for
    every row, with a note; the same numbers as Δm against the seg baselines alone."""
    aux = write(tmp_path / "aux.json", {"final": {"seg/mIoU": 55.0, "seg/pixAcc": 88.0, "depth/abs_err": 0.9,
                                                  "depth/rel_err": 0.9}, "auxiliary_tasks": ["depth"]})
    assert _tool("delta").main([str(aux), "--baselines", *map(str, files["stl"])]) == 0
    out = capsys.readouterr()
    assert "auxiliary task(s) depth" in out.err and "left out of Δm" in out.err
    want = delta_m({"seg/mIoU": 55.0, "seg/pixAcc": 88.0}, {"seg/mIoU": 50.0, "seg/pixAcc": 80.0})
    assert f"{want:+.2f} |" in out.out and "depth/abs_err" not in out.out
