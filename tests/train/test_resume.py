"""Resuming, third round: a run killed after its final save is completed without training; logged numbers after a
resume equal an uninterrupted run's; only an allow-list of fields may change on resume; a stop signal after the
final save exits at once and leaves a run that --resume completes."""

import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from test_reliability import Killed, args_for  # the same run settings (tests/train is on pytest's path)

import sftlab.train.sft as sft
from helpers import killed_before_final_save
from sftlab.config import CleanArguments, DataArguments, ModelArguments
from sftlab.errors import UserError
from sftlab.run_dir import has_final, is_complete
from sftlab.train.config import TrainConfig
from sftlab.train.resume import AMENDABLE, IGNORED
from sftlab.train.sft import train


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return train(*args_for(tmp_path_factory.mktemp("resume") / "straight"))


def records(out: Path, name: str = "trainer_log.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def kill(*args, **kwargs):
    raise Killed()


@pytest.mark.parametrize("where", ["after_the_final_save", "writing_the_report"])
def test_a_run_killed_after_its_final_save_is_completed_by_resume_without_training(straight, tmp_path, monkeypatch,
                                                                                   capsys, where):
    import sftlab.eval.run_report as run_report

    run = tmp_path / "run"
    monkeypatch.setattr(*((sft, "SFT", dataclasses.replace(sft.SFT, finish=kill)) if where == "after_the_final_save"
                          else (run_report, "write_run_report", kill)))
    with pytest.raises(Killed):
        train(*args_for(run))
    monkeypatch.undo()
    assert has_final(run) and not is_complete(run) and not (run / "report.md").exists()
    with pytest.raises(UserError, match="already holds a run: pass --resume"):
        train(*args_for(run))
    adapter = (run / "adapter_model.safetensors").read_bytes()
    monkeypatch.setattr(sft.SftlabTrainer, "train", kill)  # completing must not train
    capsys.readouterr()
    train(*args_for(run, "--resume"))
    assert "completing them with the run's recorded settings (no training)" in capsys.readouterr().out
    assert is_complete(run) and (run / "adapter_model.safetensors").read_bytes() == adapter
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in straight.iterdir())
    logs = records(run)
    assert [r["step"] for r in logs if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert sum("train_runtime" in r for r in logs) == 1  # the summary, once
    assert [(r["step"], r.get("final", False)) for r in records(run, "predictions.jsonl")] == [
        (3, False), (6, False), (6, True)]  # the final probe once, even when the kill came after it
    assert "## Probe replies over training" in (run / "report.md").read_text()
    train(*args_for(run, "--resume"))
    assert "is finished" in capsys.readouterr().out


def test_sigterm_during_the_final_evaluation_exits_143_at_once_and_resume_completes(tmp_path, monkeypatch, capsys):
    """The signal arrives as the held-out evaluation starts: the process exits with 143 at once (the evaluation,
    minutes on a real model, never runs), and --resume completes it."""
    import sftlab.eval.evaluate as evaluate

    original, evaluated = evaluate.evaluate, []

    def signal_then_evaluate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        evaluated.append(True)  # not reached: the handler raises first
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate", signal_then_evaluate)
    run = tmp_path / "run"
    extra = ("--final_eval_samples", "2", "--final_eval_max_new_tokens", "4", "--retention_check", "false")
    with pytest.raises(SystemExit) as stopped:
        train(*args_for(run, *extra))
    assert stopped.value.code == 143 and evaluated == []
    assert "stopped by SIGTERM during the steps after the final save: the final weights in" in capsys.readouterr().out
    assert has_final(run) and not is_complete(run) and not (run / "eval").exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are put back
    monkeypatch.undo()
    train(*args_for(run, *extra, "--resume"))
    assert is_complete(run)
    assert json.loads((run / "eval" / "results.json").read_text())["tuned"]["n"] == 2


@pytest.mark.slow  # a measured 3-5 s: kept out of the quick loop
def test_logged_numbers_after_a_resume_equal_an_uninterrupted_runs(tmp_path, monkeypatch):
    """Logging every 4 steps, killed in step 5 and resumed from the checkpoint of step 3: the loss logged at step
    4 averages steps 1-4 as the uninterrupted run's does, and every logged number matches."""
    extra = ("--logging_steps", "4")
    whole = tmp_path / "whole"
    train(*args_for(whole, *extra))
    compute_loss = sft.SftlabTrainer.compute_loss

    def killed_in_step_5(self, *args, **kwargs):
        if self.state.global_step == 4:
            raise Killed()
        return compute_loss(self, *args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(sft.SftlabTrainer, "compute_loss", killed_in_step_5)
    with pytest.raises(Killed):
        train(*args_for(run, *extra))
    monkeypatch.undo()
    train(*args_for(run, *extra, "--resume"))
    changing = {"train_runtime", "train_samples_per_second", "train_steps_per_second"}
    expected, got = records(whole), records(run)
    assert [sorted(r) for r in got] == [sorted(r) for r in expected]
    assert [r["step"] for r in got] == [4, 6]  # step 4's record, then the summary
    for a, b in zip(expected, got):
        for key in a.keys() - changing:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def refused(run: Path, *extra) -> str:
    with pytest.raises(UserError) as error:
        train(*args_for(run, "--resume", *extra))
    return str(error.value)


@pytest.fixture
def unfinished(straight, tmp_path):
    return killed_before_final_save(straight, tmp_path / "run")


def test_resume_refuses_every_change_that_is_not_on_the_allow_list(unfinished):
    message = refused(unfinished, "--label_smoothing_factor", "0.1", "--neftune_noise_alpha", "5")
    assert "label_smoothing_factor: 0.0 -> 0.1" in message and "neftune_noise_alpha: None -> 5.0" in message
    assert "Only logging, evaluation, saving, tracking and probe settings may change on resume" in message
    message = refused(unfinished, "--max_steps", "12")
    assert "max_steps: 6 -> 12 (the learning-rate schedule of the steps already taken depends on it" in message
    assert not (unfinished / "amendments.jsonl").exists()


def test_a_changed_data_file_is_named(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"answer number {i}"}) + "\n"
                            for i in range(30)))
    run = tmp_path / "own"
    train(*args_for(run, "--data_files", str(data), "--max_steps", "3"))
    shutil.rmtree(run / "eval", ignore_errors=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (run / name).unlink()
    data.write_text(data.read_text().replace("answer number 7", "answer number seven"))
    message = refused(run, "--data_files", str(data), "--max_steps", "3")
    assert f"data file {data} changed since the run started (its content differs)" in message
    assert "data_fingerprint" not in message


def test_an_amendment_is_recorded_only_once_training_resumed_with_it(unfinished, monkeypatch):
    monkeypatch.setattr(sft, "load_model", kill)
    with pytest.raises(Killed):
        train(*args_for(unfinished, "--resume", "--logging_steps", "2"))
    assert not (unfinished / "amendments.jsonl").exists()
    monkeypatch.undo()
    train(*args_for(unfinished, "--resume", "--logging_steps", "2"))
    assert records(unfinished, "amendments.jsonl") == [
        {"resumed_at_step": 6, "changed": {"train.logging_steps": [1, 2]}}]


def test_the_allow_list_names_only_fields_that_exist():
    sections = {"model": ModelArguments, "data": DataArguments, "clean": CleanArguments, "train": TrainConfig}
    for key in AMENDABLE | IGNORED:
        section, name = key.split(".", 1)
        assert name in {f.name for f in dataclasses.fields(sections[section])}, key
