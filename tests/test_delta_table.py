"""tools/delta_table.py on hand-written metrics.json files: Δm against the baselines, seed averaging, the
table, resuming without training, head overrides kept to the configs that have the head."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mtv_tool_delta_table", ROOT / "tools" / "delta_table.py")
dt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dt)

BASE = {"seg/mIoU": 50.0, "seg/pixAcc": 80.0, "depth/abs_err": 0.5, "depth/rel_err": 0.2, "normal/mean": 30.0,
        "normal/median": 25.0, "normal/within_11.25": 20.0, "normal/within_22.5": 40.0, "normal/within_30": 50.0}


def scaled(factor_good):
    """BASE with every metric ``factor_good`` times better: higher-is-better x f, errors / f."""
    higher = {"mIoU", "pixAcc", "within_11.25", "within_22.5", "within_30"}
    return {k: v * factor_good if k.split("/")[1] in higher else v / factor_good for k, v in BASE.items()}


def write(out, name, seed, final, step_ms=100.0):
    d = out / name / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"final": final, "step_ms_per_iter": step_ms}))


@pytest.fixture
def out(tmp_path):
    for task in ("seg", "depth", "normal"):  # each baseline reports only its own task's metrics
        own = {k: v for k, v in BASE.items() if k.startswith(task + "/")}
        write(tmp_path, f"stl_{task}", 0, {**own, f"{task}/extra": 1.0})
        write(tmp_path, f"stl_{task}", 1, own)
    return tmp_path


def test_resume_and_table(out, monkeypatch, capsys):
    # ew: identical to the baselines (Δm 0). pcgrad_rep: seed 0 10% better on the higher-is-better
    # metrics and errors / 1.1, seed 1 equal to the baselines. mgda: diverged (NaN).
    for seed in (0, 1):
        write(out, "ew", seed, BASE, step_ms=100.0 + seed * 20)
        write(out, "pcgrad_rep", seed, scaled(1.1) if seed == 0 else BASE)
        write(out, "mgda", seed, {**BASE, "depth/abs_err": math.nan})
    monkeypatch.setattr(dt.subprocess, "run", lambda *a, **k: pytest.fail("trained although metrics.json exists"))
    argv = ["--out", str(out), "--seeds", "0", "1", "model.heads.seg.channels=64", "--methods", "ew", "pcgrad_rep",
            "mgda", "--iters", "7", "data.size=[32,40]"]
    assert dt.main(argv) == 0
    table = (out / "table.md").read_text()
    assert table in capsys.readouterr().out
    assert "7 iterations, seed(s) 0 1, 32x40 images" in table
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ")}
    assert rows["single-task"] == ["—", "50.00", "0.500", "30.00", "0.00", "—"]
    assert rows["ew"] == ["loss", "50.00", "0.500", "30.00", "0.00 ± 0.00", "110"]
    assert rows["mgda"][0] == "param" and rows["mgda"][4].startswith("NaN")
    # Seed mean then Δm: higher-is-better terms -5 %, error terms (mean of x and x/1.1) / x - 1.
    pc = dt.mean_over_seeds([{"final": scaled(1.1)}, {"final": BASE}], dt.METRICS)
    expected = (5 * -5.0 + 4 * ((1 + 1 / 1.1) / 2 - 1) * 100) / 9
    assert dt.safe_delta(pc, BASE) == pytest.approx(expected)
    assert rows["pcgrad_rep"][0] == "rep" and rows["pcgrad_rep"][4].startswith(f"{expected:.2f} ± ")
    assert float(rows["pcgrad_rep"][4].split("±")[1]) == pytest.approx(abs(expected) * math.sqrt(2), rel=0.05)


def test_failed_method_and_head_overrides(out, monkeypatch):
    calls = []

    def fake_run(cmd, **kw):  # a training run that fails without writing metrics.json
        calls.append(cmd)
        return type("Done", (), {"returncode": 1})()

    monkeypatch.setattr(dt.subprocess, "run", fake_run)
    assert dt.main(["--out", str(out), "--methods", "ew", "model.heads.normal.channels=8"]) == 0
    (cmd,) = calls  # only ew trained: the seed-0 baselines exist
    assert "model.heads.normal.channels=8" in cmd and f"work_dir={out / 'ew' / 'seed0'}" in cmd
    # train.py's --resume takes an optional PATH: anything after it would be read as the checkpoint
    assert cmd[-1] == "--resume"
    assert "| ew | loss | failed |" in (out / "table.md").read_text()
    stl_seg = dt.CONFIGS / "stl_seg.yaml"
    assert dt.overrides_for(stl_seg, ["model.heads.normal.channels=8", "model.heads.seg.channels=8", "seed=1"]) \
        == ["model.heads.seg.channels=8", "seed=1"]
