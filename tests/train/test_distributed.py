"""Two processes on CPU (gloo) through accelerate: the same seeded split in both, disjoint shards of it, one
writer, one log, one adapter, and the per-step losses of a 1-process run with the same global batch. The data
holds a rejected row of every reason and `sftlab data prepare` cleans it in a worker pool first; both processes
read what it prepared. Without prepared data, a multi-process run stops at once in every process with one line."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO

# Runs sftlab's CLI with the collator wrapped to record a hash of every sample this process trains on.
TRACER = '''
import hashlib, json, os, sys
from trl.trainer import sft_trainer
from sftlab.cli import main

class Traced(sft_trainer.DataCollatorForLanguageModeling):
    def __call__(self, examples, *args, **kwargs):
        from accelerate import PartialState
        rank = PartialState().process_index
        with open(os.path.join(os.environ["TRACE_DIR"], f"rank{rank}.jsonl"), "a") as f:
            for e in examples:
                f.write(json.dumps(hashlib.sha1(str(list(e["input_ids"])).encode()).hexdigest()) + "\\n")
        return super().__call__(examples, *args, **kwargs)

import sftlab.train.sft as sft
sft.sft_collator = lambda pad_token_id, padding_free: Traced(pad_token_id, padding_free=padding_free)
import sftlab.data.cleaner as cleaner
cleaner.BATCH_ROWS = 16  # a small file in many batches, so that num_proc 2 cleans it in a worker pool
sys.exit(main(sys.argv[1:]))
'''


def sample_hash(input_ids) -> str:
    return hashlib.sha1(str(list(input_ids)).encode()).hexdigest()


def dirty_demo_data(folder: Path) -> str:
    """The demo's 177 rows and 13 planted defects, one of every reason a default-settings file can have."""
    from sftlab.data.load import demo_data_path

    sys.path.insert(0, str(REPO / "benchmarks"))
    from dirty_data import AUTO_REASONS, with_defects

    path = folder / "demo_dirty.jsonl"
    if not path.exists():
        rows = json.loads(demo_data_path().read_text(encoding="utf-8"))
        path.write_bytes(b"\n".join(with_defects(rows, 256, reasons=AUTO_REASONS, share=0)) + b"\n")
    return str(path)


def write_config(tmp_path, name, config) -> Path:
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    (tmp_path / "tracer.py").write_text(TRACER)
    return tmp_path / f"{name}.yaml"


def launch(tmp_path, name, processes, config, trace):
    write_config(tmp_path, name, config)
    accelerate = Path(sys.executable).with_name("accelerate")
    return subprocess.run(
        # --multi_gpu starts the processes through torchrun; use_cpu then makes them a gloo group on the CPU
        # (`accelerate launch --cpu --num_processes 2` starts one process: accelerate 1.15's simple launcher)
        [str(accelerate), "launch", "--multi_gpu" if processes > 1 else "--cpu", "--num_processes", str(processes),
         "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(tmp_path / "tracer.py"), "train",
         "--config", str(tmp_path / f"{name}.yaml")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRACE_DIR": str(trace)},
    )


def run(tmp_path, name, processes, accumulation):
    out, trace = tmp_path / name, tmp_path / f"{name}-trace"
    trace.mkdir()
    config = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    config.update(data_files=[dirty_demo_data(tmp_path)], num_proc=2,
                  max_tokens_per_batch=None, per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
                  max_steps=4, save_steps=2, logging_steps=1, eval_strategy="no", report_to="none",
                  final_eval_samples=2, final_eval_max_new_tokens=4, probe_max_new_tokens=4, output_dir=str(out),
                  use_cpu=True)
    if processes > 1:  # a multi-process run reads prepared data: prepared first, by the same config
        prepared = subprocess.run([sys.executable, str(tmp_path / "tracer.py"), "data", "prepare", "--config",
                                   str(write_config(tmp_path, name, config))], capture_output=True, text=True,
                                  cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRACE_DIR": str(trace)})
        assert prepared.returncode == 0, prepared.stderr[-3000:]
        assert "`sftlab train` with the same config reads it" in prepared.stdout
    result = launch(tmp_path, name, processes, config, trace)
    assert result.returncode == 0, result.stderr[-5000:]
    traces = {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in sorted(trace.iterdir())}
    return out, result, traces


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.slow
def test_two_process_cpu_training_writes_one_run_matching_one_process(tmp_path):
    out, result, traces = run(tmp_path, "ddp", processes=2, accumulation=1)
    # each process prints the split it prepared (the main one first; the other read its cache): the same, with
    # every planted defect counted by its reason
    reasons = ("bad_json 1, invalid_utf8 1, invalid_text 1, too_deep 1, malformed_record 1, invalid_tool_call 1, "
               "empty_instruction 1, empty_response 1, role_order 1, boilerplate 1, duplicate 1, near_duplicate 1, "
               "too_long 1")
    assert result.stdout.count(f"data: 190 rows read, 177 kept, 13 rejected ({reasons})") == 2
    assert result.stdout.count("168 train, 9 held out") == 2
    assert (out / "adapter_config.json").exists() and (out / "checkpoint-4").is_dir()
    assert sorted(p.name for p in out.rglob("adapter_model.safetensors")) == ["adapter_model.safetensors"] * 3
    assert not (out / ".final.tmp").exists()
    steps = [json.loads(line)["step"] for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 4]  # written once, by the main process
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2 * 3  # 2 probes x (2 saves + final)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4

    # disjoint shards of the training split: 4 steps x 4 samples on each process, none held out (accelerate's
    # data loader collates one batch ahead, so each process collated a fifth batch it did not train on)
    assert set(traces) == {"rank0", "rank1"} and len(traces["rank1"]) == 20
    traces = {rank: hashes[:16] for rank, hashes in traces.items()}
    assert not set(traces["rank0"]) & set(traces["rank1"])
    from sftlab.chat_format import ChatRenderer
    from sftlab.model.load import load_tokenizer

    renderer = ChatRenderer(load_tokenizer(out), 256)
    held_out = [json.loads(line)["messages"] for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert not {sample_hash(renderer.render(m).input_ids) for m in held_out} & set(traces["rank0"] + traces["rank1"])

    # one process accumulating two micro-batches per step sees the same samples and logs the same losses
    single, _, single_traces = run(tmp_path, "single", processes=1, accumulation=2)
    assert sorted(single_traces["rank0"][:32]) == sorted(traces["rank0"] + traces["rank1"])
    assert len(losses(out)) == 4 and losses(single) == pytest.approx(losses(out), abs=1e-4)


@pytest.mark.slow
def test_a_multi_process_run_without_prepared_data_stops_in_every_process_with_one_line(tmp_path):
    """No process prepares the data for the others (one tokenizing while the rest wait is how large runs time
    out): each says to run `sftlab data prepare` first, at once. That command then stops at a --strict row."""
    config = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    config.update(data_files=[dirty_demo_data(tmp_path)], num_proc=2, strict=True, report_to="none",
                  output_dir=str(tmp_path / "strict"), use_cpu=True)
    (tmp_path / "trace").mkdir()
    result = launch(tmp_path, "strict", 2, config, tmp_path / "trace")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("sftlab train: error:")]
    assert len(errors) == 2, result.stderr[-3000:]
    assert all(line.startswith("sftlab train: error: the data is not prepared for this run, and a multi-process run "
                               "does not prepare it") and "run `sftlab data prepare` with the same config first"
               in line for line in errors)
    # (the launcher's own traceback, for the processes that exited with an error, comes after their lines)
    assert "Traceback (most recent call last)" not in result.stderr.split("sftlab train: error:")[0]
    prepared = subprocess.run([sys.executable, str(tmp_path / "tracer.py"), "data", "prepare", "--config",
                               str(tmp_path / "strict.yaml")], capture_output=True, text=True, cwd=tmp_path,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TRACE_DIR": str(tmp_path / "trace")})
    assert prepared.returncode == 2
    assert prepared.stderr.strip().splitlines()[-1].endswith(
        "demo_dirty.jsonl:29: invalid_utf8: invalid UTF-8 at byte 27 (--strict)")


class FakeAccelerator:
    def __init__(self, stage=None):
        self.state = type("State", (), {"deepspeed_plugin": type("Plugin", (), {"zero_stage": stage})()})()
        self.barriers = 0

    def wait_for_everyone(self):
        self.barriers += 1


class FakeTrainer:
    """What save_final and sharded_engine read of a trainer, on a process other than the main one."""

    def __init__(self, fsdp=False, zero_stage=None):
        import torch

        self.is_fsdp_enabled, self.is_deepspeed_enabled = fsdp, zero_stage is not None
        self.accelerator = FakeAccelerator(zero_stage)
        self.model = torch.nn.Linear(2, 2)
        self.saved_to = []

    def is_world_process_zero(self):
        return False

    def save_model(self, folder):
        self.saved_to.append(folder)


@pytest.mark.parametrize("trainer, engine", [(FakeTrainer(fsdp=True), "FSDP"), (FakeTrainer(zero_stage=3), "ZeRO-3"),
                                             (FakeTrainer(zero_stage=2), None), (FakeTrainer(), None)])
def test_sharded_engines_are_recognized(trainer, engine):
    from sftlab.train.lifecycle import sharded_engine

    assert sharded_engine(trainer) == engine


def test_every_process_takes_part_in_the_final_save_and_only_the_main_one_writes(tmp_path):
    """FSDP2 and ZeRO-3 gather the weights inside save_model, a collective: every process must call it (the
    2-process FSDP2 run itself cannot run on CPU: accelerate enables FSDP only over GPU process groups)."""
    from sftlab.train.run_files import save_final

    trainer = FakeTrainer(fsdp=True)
    (tmp_path / ".final.tmp").mkdir()
    (tmp_path / ".final.tmp" / "keep").write_text("the main process's")
    save_final(trainer, tokenizer=None, out=tmp_path, base_name=None)
    assert trainer.saved_to == [str(tmp_path / ".final.tmp")] and trainer.accelerator.barriers == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == [".final.tmp", "keep"]  # nothing written, nothing removed
