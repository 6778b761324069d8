"""Smoke tests of `tools/benchmark.py`: the data rows on a tiny shape (the real row is 288x384), the
interleaved timing and the operator count the step rows use, the step rows on their small setup, and
the host solve rows."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_data_rows(tmp_path, monkeypatch, capsys):
    bench = _load_benchmark("mtv_tool_benchmark")
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
    bench = _load_benchmark("mtv_tool_benchmark2")
    calls = []
    times = bench.paired_ratios({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, "cpu",
                                rounds=3, per_round=2, warmup=1)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]
    assert set(times) == {"a", "b"} and all(len(v) == 3 for v in times.values())
    assert bench.median_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]) == 3.0


def test_dispatched_ops_counts_outermost_operator_calls():
    import torch

    bench = _load_benchmark("mtv_tool_benchmark3")
    a = torch.randn(4, 4)

    def three_ops():
        b = a + 1  # one call
        with torch.profiler.record_function("scope"):  # a scope is not an operator: its calls count
            c = torch.nn.functional.linear(b, a)  # one call, whatever it calls inside
        return c.sum()  # one call

    assert bench.dispatched_ops(three_ops) == 3


def test_benchmark_solve_rows(tmp_path):
    bench = _load_benchmark("mtv_tool_benchmark4")
    out = tmp_path / "rows.json"
    bench.main(["--only", "solve", "--repeats", "1", "--json", str(out)])
    rows = json.loads(out.read_text())
    from mtvision.balancing import AGGREGATORS

    assert len(rows) == 2 * len(AGGREGATORS)
    assert all(r["host_ms"] > 0 and r["shape"] in ("T3", "T10") for r in rows)


@pytest.mark.slow
def test_benchmark_step_rows_on_the_host_bound_setup(tmp_path, monkeypatch):
    """The step rows run end to end (the host-bound setup only, three methods): each row has its
    ratios, operator counts, and the issue's limit with whether the ratio is within it."""
    bench = _load_benchmark("mtv_tool_benchmark5")
    monkeypatch.setattr(bench, "STEP_SETUPS", [bench.STEP_SETUPS[1]._replace(calls_per_timing=2)])
    monkeypatch.setattr(bench, "STEP_METHODS", [("ew", "param"), ("mgda", "param"), ("pcgrad", "rep")])
    out = tmp_path / "rows.json"
    bench.main(["--only", "step", "--device", "cpu", "--repeats", "2", "--json", str(out)])
    rows = {r["op"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["train step ew (param)", "train step mgda (param)", "train step pcgrad (rep)"]
    param, rep = rows["train step mgda (param)"], rows["train step pcgrad (rep)"]
    assert param["floor_ops"] > 0 and param["step_ops"] > param["floor_ops"] and param["floor_ms"] > 0
    assert param["limit"] == "ratio_to_floor <= 1.15" and param["within"] == (param["ratio_to_floor"] <= 1.15)
    assert rep["limit"] == "ratio_to_ew <= 1.3" and rep["within"] == (rep["ratio_to_ew"] <= 1.3)
    assert "limit" not in rows["train step ew (param)"]
