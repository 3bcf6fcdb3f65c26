"""The GPU benchmark's code path, scaled down on CPU (`--tiny`): every configuration trains and is reported."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
