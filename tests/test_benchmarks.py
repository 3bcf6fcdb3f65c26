"""The GPU benchmark's code path, scaled down on CPU (`--tiny`): every configuration trains and is reported."""

import importlib.util

import pytest

from helpers import REPO


@pytest.mark.slow
def test_gpu_benchmark_runs_tiny_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("gpu_glm4_9b", REPO / "benchmarks/gpu_glm4_9b.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--tiny", "--samples", "40", "--warmup", "1"])
    assert len(rows) == 6  # two LoRA shapes x (tutorial, sftlab with and without checkpointing)
    assert all(result["tokens_per_s"] > 0 for *_, result, _ in rows)
    out = capsys.readouterr().out
    assert out.count("| r=8 q/k/v |") == 3 and out.count("| r=16 all-linear |") == 3


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / f"benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tool_call_benchmark_scores_a_call_by_its_tool_and_required_arguments():
    bench = load_benchmark("tool_calls_real")
    case = {"tool": "get_weather", "arguments": {"city": "Rome"},
            "tools": [{"type": "function", "function": {"name": n, **bench.TOOLS[n]}} for n in ("get_weather",
                                                                                              "set_timer")]}
    assert bench.score('{"name": "get_weather", "arguments": {"city": "rome"}}', case) == {
        "no_tool": False, "well_formed": True, "right": True}
    assert bench.score('{"name": "get_weather", "arguments": {"city": "Paris"}}', case)["right"] is False
    assert bench.score('{"name": "set_timer", "arguments": {"minutes": 5}}', case) == {
        "no_tool": False, "well_formed": True, "right": False}
    assert bench.score('{"name": "set_timer", "arguments": {}}', case)["well_formed"] is False  # minutes missing
    assert bench.score('{"name": "find_recipe", "arguments": {"dish": "x"}}', case)["well_formed"] is False
    assert bench.score("It is sunny in Rome.", case)["well_formed"] is False
    assert bench.score("The answer is 16.", {**case, "tool": None}) == {"no_tool": True, "called": False}


def test_the_tool_call_benchmark_holds_out_its_prompts():
    import random

    bench = load_benchmark("tool_calls_real")
    rows = bench.training_rows(240, random.Random(0))
    cases = bench.held_out_prompts(random.Random(1))
    asked = {r["messages"][0]["content"] for r in rows}
    assert len(rows) == 240 and len(cases) == 43 and not asked & {c["prompt"] for c in cases}
    assert all(c["tool"] in {t["function"]["name"] for t in c["tools"]} for c in cases if c["tool"])


@pytest.mark.slow
def test_the_data_scale_benchmark_measures_each_size(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # its sibling modules (the row generator)
    table = load_benchmark("data_scale").main(["--rows", "300,900", "--repeats", "1", "--variants",
                                               "single,datatrove2"])
    assert [(row["variant"], row["rows"] > n) for row, n in zip(table, (300, 300, 900, 900))] == [
        ("single", True), ("datatrove2", True), ("single", True), ("datatrove2", True)]  # planted defects added
    assert all(row["seconds"] > 0 and row["peak_mb"] > 50 and 0 < row["kept"] <= row["rows"] for row in table)
    assert [row["kept"] for row in table[:2]] == [table[0]["kept"]] * 2  # the same rows kept either way
    out = capsys.readouterr().out
    assert "every variant kept the same rows at each size: True" in out and "at 10M rows" in out
