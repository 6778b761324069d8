"""Smoke tests of `tools/benchmark.py`: the data rows on a tiny shape (the real row is 288x384), and the
interleaved timing the step rows use."""

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


def test_paired_ratios_interleave_and_take_per_round_ratios():
    spec = importlib.util.spec_from_file_location("mtv_tool_benchmark2", ROOT / "tools" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []
    times = bench.paired_ratios({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, "cpu",
                                rounds=3, per_round=2, warmup=1)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]
    assert set(times) == {"a", "b"} and all(len(v) == 3 for v in times.values())
    assert bench.median_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]) == 3.0
