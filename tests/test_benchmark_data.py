"""Smoke test of `tools/benchmark.py --only data` on a tiny shape (the real row is 288x384)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_data_rows(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("mtv_tool_benchmark", ROOT / "tools" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "DATA_SHAPE", ("tiny", 12, 16))
    monkeypatch.setattr(bench, "DATA_SAMPLES", 2)
    out = tmp_path / "rows.json"
    bench.main(["--only", "data", "--device", "cpu", "--repeats", "1", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [r["op"] for r in rows][0] == "data nyuv2 npy: read + check + tensors"
    for r in rows:
        assert r["shape"] == "tiny 12x16" and r["samples_per_s"] > 0 and r["cpu_ms_per_sample"] > 0
    assert "samples_per_s" in capsys.readouterr().out
