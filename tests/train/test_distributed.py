"""Two processes on CPU (gloo) through accelerate: the same seeded split in both, one writer, one log."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_process_cpu_training_writes_one_run(tmp_path):
    out = tmp_path / "run"
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run(
        [str(accelerate), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "sftlab.cli", "train", "--config", str(REPO / "configs/demo.yaml"),
         "--output_dir", str(out), "--max_steps", "4", "--save_steps", "2", "--report_to", "none",
         "--eval_strategy", "no", "--final_eval_samples", "2", "--final_eval_max_new_tokens", "4",
         "--probe_max_new_tokens", "4", "--logging_steps", "1"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data: 177 rows read, 177 kept" in result.stdout
    assert (out / "adapter_config.json").exists() and (out / "checkpoint-4").is_dir()
    steps = [json.loads(line)["step"] for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 4]  # written once, by the main process
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2 * 3  # 2 probes x (2 saves + final)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
