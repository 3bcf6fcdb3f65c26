"""Runs that lose nothing: checkpoints count only when committed, a torn one is skipped by --resume, old ones go
only after a new one is committed, a changed recipe is refused on resume, and one run holds a folder at a time."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sftlab.train.lifecycle as lifecycle
import sftlab.train.sft as sft
from helpers import REPO
from sftlab.errors import UserError
from sftlab.train.checkpoints import MARKER, RunLock, newest_committed, why_not_committed
from sftlab.train.config import parse_args
from sftlab.train.sft import train


def args_for(out, *extra):
    return parse_args([
        "--config", str(REPO / "configs/demo.yaml"), "--output_dir", str(out), "--report_to", "none",
        "--max_steps", "6", "--save_steps", "3", "--eval_strategy", "no", "--logging_steps", "1",
        "--probe_prompts", "hi", "--probe_max_new_tokens", "2", "--final_eval_samples", "0",
        "--save_total_limit", "1", *extra,
    ])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run: checkpoints at steps 3 and 6 (only the newest kept), the final adapter."""
    out = tmp_path_factory.mktemp("reliability") / "straight"
    train(*args_for(out))
    return out


def losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())
            if "loss" in r]


def assert_same_run(a, b):
    assert losses(a) == losses(b)
    first, second = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_a_finished_run_keeps_one_committed_checkpoint(straight):
    assert [p.name for p in straight.glob("checkpoint-*")] == ["checkpoint-6"]
    assert why_not_committed(straight / "checkpoint-6") is None
    marker = json.loads((straight / "checkpoint-6" / MARKER).read_text())["files"]
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(marker)


@pytest.mark.parametrize("damage, reason", [
    ("no_marker", "no commit marker"),
    ("missing_file", "scheduler.pt is missing"),
    ("truncated", "adapter_model.safetensors has"),
    ("bit_flip", "adapter_model.safetensors differs from what was committed"),
])
def test_resume_skips_a_damaged_newest_checkpoint(straight, tmp_path, damage, reason):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight, run)
    shutil.copytree(run / "checkpoint-6", run / "checkpoint-9")  # a newer checkpoint, then damaged
    target = run / "checkpoint-9"
    adapter = target / "adapter_model.safetensors"
    if damage == "no_marker":
        (target / MARKER).unlink()
    elif damage == "missing_file":
        (target / "scheduler.pt").unlink()
    elif damage == "truncated":
        adapter.write_bytes(adapter.read_bytes()[:-10])
    else:
        data = bytearray(adapter.read_bytes())
        data[-5] ^= 0x01
        adapter.write_bytes(bytes(data))
    committed, skipped = newest_committed(run)
    assert committed == run / "checkpoint-6"
    assert len(skipped) == 1 and skipped[0].startswith("checkpoint-9: ") and reason in skipped[0]


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


@pytest.mark.parametrize("stage", [pytest.param(stage, marks=[pytest.mark.slow] if stage != "before_marker" else [])
                                   for stage in ("model_saved", "optimizer_saved", "before_marker", "writing_marker")])
def test_kill_while_writing_a_checkpoint_then_resume_ends_as_the_uninterrupted_run(straight, tmp_path, monkeypatch,
                                                                                  stage):
    """The second checkpoint (step 6) is torn at `stage`; --resume goes back to the committed step 3 (still
    there: rotation waits for the commit) and ends bit-identical to the uninterrupted run."""
    from transformers import Trainer

    import sftlab.train.checkpoints as checkpoints

    def kill_at_step_6(original):
        def wrapper(self_or_path, *args, **kwargs):
            step = self_or_path.state.global_step if isinstance(self_or_path, Trainer) else int(
                str(Path(self_or_path).parent.name).split("-")[-1])
            if step == 6:
                raise Killed(stage)
            return original(self_or_path, *args, **kwargs)
        return wrapper

    if stage == "model_saved":
        monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler",
                            kill_at_step_6(Trainer._save_optimizer_and_scheduler))
    elif stage == "optimizer_saved":
        monkeypatch.setattr(Trainer, "_save_rng_state", kill_at_step_6(Trainer._save_rng_state))
    elif stage == "before_marker":
        monkeypatch.setattr(lifecycle, "commit", lambda folder: (_ for _ in ()).throw(Killed(stage))
                            if folder.name == "checkpoint-6" else checkpoints.commit(folder))
    else:
        monkeypatch.setattr(checkpoints, "write_json", kill_at_step_6(checkpoints.write_json))
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train(*args_for(run))
    monkeypatch.undo()
    committed, skipped = newest_committed(run)
    assert committed == run / "checkpoint-3" and skipped and skipped[0].startswith("checkpoint-6: ")
    with pytest.raises(UserError, match="already holds a run: pass --resume"):
        train(*args_for(run))
    train(*args_for(run, "--resume"))
    assert_same_run(straight, run)
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5, 6]  # every step logged once


def test_a_run_killed_in_its_first_checkpoint_can_start_again(straight, tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(lifecycle, "commit", lambda folder: (_ for _ in ()).throw(Killed("first checkpoint")))
    with pytest.raises(Killed):
        train(*args_for(run))
    monkeypatch.undo()
    with pytest.raises(UserError, match="no committed checkpoint .*checkpoint-3: no commit marker.*run without"):
        train(*args_for(run, "--resume"))
    train(*args_for(run))  # the torn checkpoint and the interrupted logs are cleared, with a line
    assert_same_run(straight, run)


def test_resume_refuses_a_changed_recipe_before_writing_anything(straight, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight, run)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (run / name).unlink()  # as if killed after checkpoint-6, before the final save
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UserError) as error:
        train(*args_for(run, "--resume", "--learning_rate", "1e-2", "--lora_r", "8", "--seed", "7"))
    message = str(error.value)
    assert "learning_rate: 0.003 -> 0.01" in message and "lora_r: 32 -> 8" in message and "seed: 42 -> 7" in message
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    other = tmp_path / "other.jsonl"
    other.write_text('{"instruction": "hi", "output": "hello"}\n' * 3)
    with pytest.raises(UserError, match="data_files: \\['sftlab:demo'\\] -> ") as error:
        train(*args_for(run, "--resume", "--data_files", str(other)))
    assert "fingerprint" not in str(error.value)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_records_allowed_changes_as_an_amendment(straight, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight, run)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (run / name).unlink()
    record = (run / "sftlab_config.yaml").read_text()
    train(*args_for(run, "--resume", "--max_steps", "6", "--logging_steps", "2", "--probe_max_new_tokens", "3"))
    assert "resume: amended logging_steps, probe_max_new_tokens" in capsys.readouterr().out
    assert (run / "sftlab_config.yaml").read_text() == record
    amendment = json.loads((run / "amendments.jsonl").read_text())
    assert amendment == {"resumed_at_step": 6, "changed": {"train.logging_steps": [1, 2],
                                                           "train.probe_max_new_tokens": [2, 3]}}


def test_resuming_a_finished_run_changes_nothing(straight, capsys):
    before = {p: p.stat().st_mtime_ns for p in straight.rglob("*")}
    train(*args_for(straight, "--resume"))
    assert "is finished" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in straight.rglob("*")} == before


HOLD_LOCK = """
import sys, time
from sftlab.errors import UserError
from sftlab.train.checkpoints import RunLock
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # every process tries at the same moment
try:
    RunLock(sys.argv[1]).acquire()
except UserError as error:
    print("refused:", error, flush=True)
    sys.exit(3)
print("held", flush=True)
time.sleep(float(sys.argv[3]))
"""


def hold_lock(out, start: float, hold: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out), str(start), str(hold)],
                            stdout=subprocess.PIPE, text=True)


def test_a_second_run_on_a_locked_folder_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path, capsys):
    import signal
    import time

    out = tmp_path / "run"
    holder = hold_lock(out, time.time(), 60)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match=f"in use by another sftlab train \\(PID {holder.pid}\\)"):
            train(*args_for(out))
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: it never releases the lock itself
        holder.wait()
    lock = RunLock(out)
    lock.acquire()  # the kernel released the killed holder's lock
    assert f"taking over the lock of PID {holder.pid}, which ended without releasing it" in capsys.readouterr().out
    assert (out / ".sftlab.lock").read_text().strip() == str(os.getpid())
    lock.release()
    assert not (out / ".sftlab.lock").exists()


@pytest.mark.slow
def test_many_simultaneous_starts_get_the_lock_once(tmp_path):
    """Twelve processes try the same output_dir at the same moment, three times over: exactly one holds it each
    time (the old lock wrote the PID after creating the file, and a start reading in between took it too)."""
    import time

    for attempt in range(3):
        out = tmp_path / f"run{attempt}"
        start = time.time() + 2.0
        processes = [hold_lock(out, start, 3.0) for _ in range(12)]
        outputs = [p.communicate(timeout=60)[0] for p in processes]
        assert sorted(p.returncode for p in processes) == [0] + [3] * 11, outputs
        assert sum(o.startswith("held") for o in outputs) == 1
        assert all("in use by another sftlab train (PID " in o for o in outputs if o.startswith("refused"))


def test_a_non_finite_step_leaves_weights_and_optimizer_state_bitwise_unchanged():
    import copy

    from sftlab.train.guards import BadSteps

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    guard = BadSteps(limit=3)
    layer(torch.randn(3, 4)).sum().backward()
    guard.on_pre_optimizer_step(None, None, None, optimizer=optimizer)  # as the Trainer calls it, before step()
    optimizer.step()  # a good step: Adam has state now
    weights, state = copy.deepcopy(layer.state_dict()), copy.deepcopy(optimizer.state_dict())
    (layer(torch.randn(3, 4)) * float("nan")).sum().backward()
    guard.on_pre_optimizer_step(None, None, None, optimizer=optimizer)
    optimizer.step()
    assert all(torch.equal(weights[k], v) for k, v in layer.state_dict().items())
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(state["state"][i][k], after[i][k]) for i in after for k in after[i])
    assert (guard.skipped, guard.in_a_row) == (1, 1) and all(p.grad is None for p in layer.parameters())
    layer(torch.randn(3, 4)).sum().backward()
    guard.on_pre_optimizer_step(None, None, None, optimizer=optimizer)
    optimizer.step()
    assert guard.in_a_row == 0 and not torch.equal(weights["weight"], layer.weight)


def test_non_finite_steps_in_a_row_stop_the_run_and_are_logged_as_such(tmp_path, monkeypatch):
    """The loss is made NaN from the 5th step on (planted, so the test does not depend on how this CPU's numerics
    diverge under a huge learning rate): steps 5 and 6 are skipped and logged, the 7th stops the run."""
    compute_loss = sft.SftlabTrainer.compute_loss

    def nan_from_step_5(self, *args, **kwargs):
        result = compute_loss(self, *args, **kwargs)
        if self.state.global_step < 4:
            return result
        return (result[0] * float("nan"), *result[1:]) if isinstance(result, tuple) else result * float("nan")

    monkeypatch.setattr(sft.SftlabTrainer, "compute_loss", nan_from_step_5)
    out = tmp_path / "run"
    with pytest.raises(UserError, match="3 optimizer steps in a row had a non-finite loss or gradient and were "
                                        "skipped .*the last committed checkpoint is .*checkpoint-6$"):
        train(*args_for(out, "--max_bad_steps", "3", "--max_steps", "30", "--save_steps", "2"))
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(1, 0), (2, 0), (3, 0), (4, 0), (5, 1), (6, 2)]
    assert all(r["loss"] != 0.0 for r in records)  # never shown as 0.0
    assert not (out / "adapter_model.safetensors").exists()  # no final save
    committed, _ = newest_committed(out)
    assert committed is not None and all(torch.isfinite(t).all()
                                         for t in load_file(committed / "adapter_model.safetensors").values())


@pytest.mark.parametrize("planted, message", [
    ("zero", "3 optimizer steps in a row had a gradient of exactly zero \\(max_bad_steps 3\\): the run has diverged"),
    ("high", "3 optimizer steps in a row had a loss over 3x that of the first 5 steps \\([0-9.]+\\) \\(max_bad_steps "
             "3\\): the run has diverged"),
])
def test_divergence_that_stays_finite_stops_the_run(tmp_path, monkeypatch, planted, message):
    """From the 7th step the loss is made constant (every gradient exactly zero: the state a learning rate of 1e6
    left the model in) or ten times higher: three such steps in a row stop the run with a line that names it.
    Planted, so the test does not depend on how this CPU's numerics diverge."""
    compute_loss = sft.SftlabTrainer.compute_loss

    def diverged_from_step_7(self, *args, **kwargs):
        result = compute_loss(self, *args, **kwargs)
        if self.state.global_step < 6 or not self.model.training:
            return result
        loss = result[0] if isinstance(result, tuple) else result
        loss = loss * 0 + 6.867 if planted == "zero" else loss * 10
        return (loss, *result[1:]) if isinstance(result, tuple) else loss

    monkeypatch.setattr(sft.SftlabTrainer, "compute_loss", diverged_from_step_7)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=message + ".*the last committed checkpoint is .*checkpoint-8$"):
        train(*args_for(out, "--max_bad_steps", "3", "--max_steps", "30", "--save_steps", "4"))
    assert [r["step"] for r in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())] == [
        1, 2, 3, 4, 5, 6, 7, 8]  # the 9th step, the third bad one in a row, stopped it
    assert not (out / "adapter_model.safetensors").exists()


def test_weights_with_a_nan_are_never_saved(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from sftlab.train.guards import refuse_non_finite

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(UserError, match="refusing to save the final weights: model.layers.1.mlp.down_proj.weight has "
                                        "1 non-finite values"):
        refuse_non_finite(model, "final weights")


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(15, 143), (2, 130)])
def test_sigterm_and_sigint_commit_a_checkpoint_and_say_how_to_resume(tmp_path, signum, code):
    import signal
    import time

    out = tmp_path / "run"
    command = [sys.executable, "-m", "sftlab.cli", "train", "--config", str(REPO / "configs/demo.yaml"),
               "--output_dir", str(out), "--report_to", "none", "--max_steps", "100000", "--save_steps", "100000",
               "--eval_strategy", "no", "--logging_steps", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ))
    log = out / "trainer_log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.2)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == code, stderr[-2000:]
    line = next(x for x in stdout.splitlines() if x.startswith(f"stopped by {signal.Signals(signum).name}"))
    step = int(line.split("after step ")[1].split(":")[0])
    assert line.endswith("--resume") and f"checkpoint-{step} is committed" in line
    assert newest_committed(out) == (out / f"checkpoint-{step}", [])
    assert json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["global_step"] == step
    assert not (out / "adapter_model.safetensors").exists() and not (out / ".sftlab.lock").exists()


def test_a_second_signal_exits_at_once(monkeypatch):
    import signal

    from sftlab.train.guards import StopOnSignal

    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    stopper = StopOnSignal()
    stopper._handle(signal.SIGTERM, None)
    assert stopper.received == signal.SIGTERM and exits == []  # the first one only asks to stop after the step
    stopper._handle(signal.SIGTERM, None)
    assert exits == [143]


STOP_FLAGS = ("--save_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2")


def stopped_in_step_2(out: Path, monkeypatch, *extra: str) -> None:
    """SIGTERM during step 2, when an evaluation and a save with probes are due."""
    import signal

    compute_loss = sft.SftlabTrainer.compute_loss

    def signal_in_step_2(self, *args, **kwargs):
        if self.state.global_step == 1 and self.model.training:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler that train() installed takes it
        return compute_loss(self, *args, **kwargs)

    with monkeypatch.context() as patched, pytest.raises(SystemExit) as stopped:
        patched.setattr(sft.SftlabTrainer, "compute_loss", signal_in_step_2)
        train(*args_for(out, *STOP_FLAGS, *extra))
    assert stopped.value.code == 143


def test_a_stop_signal_commits_the_checkpoint_and_exits_without_probes_or_evaluation(tmp_path, monkeypatch):
    """SIGTERM arrives during step 2, when an evaluation and a save with probes are due: the checkpoint is
    committed, and neither the probes nor the evaluation run before the exit (they took minutes on a real model)."""
    out = tmp_path / "run"
    stopped_in_step_2(out, monkeypatch)
    assert newest_committed(out) == (out / "checkpoint-2", [])
    assert not (out / "predictions.jsonl").exists()  # no probe ran
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [(r["step"], "loss" in r, "train_runtime" in r) for r in records] == [
        (1, True, False), (2, True, False), (2, False, True)]  # two steps, then the Trainer's summary
    assert not any("eval_loss" in r for r in records)


@pytest.mark.slow  # in CI's whole run; kept out of the quick loop for its time
def test_after_a_stop_at_a_step_that_evaluates_resume_writes_its_evaluation_probes_and_retention(tmp_path,
                                                                                               monkeypatch):
    """The stopped step's evaluation record, probe replies and retention check, skipped for a prompt exit, are
    written by --resume at that step: trainer_log.jsonl and predictions.jsonl then equal an uninterrupted run's
    (timings aside). The tiny base knows too few probes for a verdict: here it is taken to know enough."""
    import sftlab.train.retention_guard as guard

    monkeypatch.setattr(guard, "knows_too_little", lambda *a: False)
    probes = guard.shipped_probes()[:8]  # the check itself is tested elsewhere: here, that it is done on resume
    monkeypatch.setattr(guard, "shipped_probes", lambda: probes)
    checked = ("--retention_at_saves", "true", "--retention_stop", "false")
    whole = train(*args_for(tmp_path / "whole", *STOP_FLAGS, *checked))
    out = tmp_path / "run"
    stopped_in_step_2(out, monkeypatch, *checked)
    train(*args_for(out, *STOP_FLAGS, *checked, "--resume"))
    timing = ("runtime", "per_second")

    def logged(run, name):
        lines = [json.loads(line) for line in (run / name).read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.endswith(timing)} for r in lines]

    assert logged(out, "predictions.jsonl") == logged(whole, "predictions.jsonl")
    got, expected = logged(out, "trainer_log.jsonl"), logged(whole, "trainer_log.jsonl")
    assert [(r["step"], sorted(r)) for r in got] == [(r["step"], sorted(r)) for r in expected]
    assert any("eval_loss" in r and r["step"] == 2 for r in got)
    assert [r["step"] for r in got if "retention/verdict" in r] == [2, 4, 6]
    for a, b in zip(expected, got):
        for key, value in a.items():
            assert b[key] == (pytest.approx(value, rel=1e-5, abs=1e-7) if isinstance(value, float) else value), key


class Payload:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_safe_by_default_no_remote_code_and_pickles_only_with_weights_only(straight, tmp_path):
    """trust_remote_code is off unless asked for; a checkpoint's pickles (optimizer, scheduler, RNG) are opened
    with weights_only=True, so a malicious one raises instead of running, even when it is committed."""
    import shutil

    from sftlab.config import ModelArguments
    from sftlab.train.checkpoints import commit

    model_args, _, _, train_args = args_for(tmp_path / "x")
    assert train_args.trust_remote_code is False and not hasattr(ModelArguments(), "trust_remote_code")
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (run / name).unlink()
    planted = tmp_path / "pwned"
    torch.save(Payload(str(planted)), run / "checkpoint-6" / "optimizer.pt")
    (run / "checkpoint-6" / MARKER).unlink()
    commit(run / "checkpoint-6")  # even a committed checkpoint with a planted pickle
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        train(*args_for(run, "--resume"))
    assert not planted.exists()


def test_a_full_disk_while_checkpointing_is_one_line_and_the_committed_checkpoint_stays(straight, tmp_path, monkeypatch):
    """torch's zip writer fails as it does on a full disk (an inline_container.cc error) while checkpoint-6 is
    written: one line naming the folder and the committed checkpoint-3, which stays intact; --resume then ends as
    the uninterrupted run."""
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "checkpoint-6" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 2048")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    run = tmp_path / "run"
    with pytest.raises(UserError, match=f"could not save checkpoint-6 in {run}: the write failed \\(no space left on "
                                        f"the device, or the disk failed\\) .*{run / 'checkpoint-3'} is committed and "
                                        "intact: free space .* continue with --resume"):
        train(*args_for(run))
    monkeypatch.undo()
    assert why_not_committed(run / "checkpoint-3") is None and newest_committed(run)[0] == run / "checkpoint-3"
    train(*args_for(run, "--resume"))
    assert_same_run(straight, run)


def test_a_full_disk_during_the_final_save_is_one_line(tmp_path, monkeypatch):
    import errno

    import peft.peft_model

    save_file = peft.peft_model.safe_save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if ".final.tmp" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)  # how PEFT writes the adapter
    run = tmp_path / "run"
    with pytest.raises(UserError, match=f"could not save the final weights in {run}: no space left on the device "
                                        f"\\({run / '.final.tmp'}/adapter_model.safetensors\\). {run / 'checkpoint-6'} "
                                        "is committed and intact"):
        train(*args_for(run))
    assert not (run / "adapter_model.safetensors").exists() and not (run / "adapter_config.json").exists()


def test_a_run_on_one_thread_or_two_differs_at_most_in_the_last_bits(straight, tmp_path):
    """What the docs state of reproducibility on CPU: the same recipe, data, seed, libraries, CPU type and thread
    count give the same bits (the kill-and-resume tests compare with torch.equal); with the intra-op thread count
    changed the order of a reduction may differ, and on an AVX-512 Xeon it does (a loss's 7th digit at step 4):
    the run is the same to float32 rounding, not bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(*args_for(tmp_path / "one_thread"))
    finally:
        torch.set_num_threads(threads)
    one, two = losses(tmp_path / "one_thread"), losses(straight)
    assert [step for step, _ in one] == [step for step, _ in two]
    assert all(abs(a - b) <= 1e-5 * abs(b) for (_, a), (_, b) in zip(one, two)), (one, two)
    first, second = (load_file(run / "adapter_model.safetensors") for run in (tmp_path / "one_thread", straight))
    assert first.keys() == second.keys()
    worst = max(float((first[k] - second[k]).abs().max() / second[k].abs().max().clamp(min=1e-12)) for k in first)
    assert worst <= 1e-3, worst


def test_a_checkpoint_committed_with_sha256_still_verifies(straight, tmp_path):
    """Markers now hold XXH3-128 hashes (fast enough for a 100 GB checkpoint); one written by an earlier sftlab with
    SHA-256 still verifies, and still catches a flipped bit."""
    import hashlib
    import shutil

    folder = Path(shutil.copytree(straight / "checkpoint-6", tmp_path / "checkpoint-6"))
    marker = json.loads((folder / MARKER).read_text())
    assert all(set(entry) == {"size", "xxh3_128"} for entry in marker["files"].values())
    old = {name: {"size": entry["size"], "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest()}
           for name, entry in marker["files"].items()}
    (folder / MARKER).write_text(json.dumps({"files": old}))
    assert why_not_committed(folder) is None
    adapter = folder / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-5] ^= 0x01
    adapter.write_bytes(bytes(data))
    assert why_not_committed(folder) == "adapter_model.safetensors differs from what was committed (damaged)"
