"""The run lifecycle every training stage shares (train/stage.py), tested on each stage: generated over every verb
of cli.VERBS whose module declares a Stage, so a new stage is covered without a test written for it. A killed run
resumed ends bit-identical to an uninterrupted one; a changed recipe, or another stage's verb, is refused on
resume; a locked folder is refused naming its holder; a non-finite step is skipped and the run goes on; a run
stopped after its final save is completed by --resume without training. Each stage runs its demo config on the
tiny GLM-4 base (not from an SFT run), six steps, checkpoints at steps 3 and 6."""

import dataclasses
import hashlib
import importlib
import json
import re
import signal
import time
from pathlib import Path

import pytest
from test_reliability import Killed, hold_lock  # tests/train is on pytest's path

from helpers import REPO, killed_before_final_save
from sftlab import cli
from sftlab.config import parse_verb
from sftlab.errors import UserError
from sftlab.run_dir import is_complete, stage_title, stage_verb
from sftlab.train.lifecycle import ReliableTrainer
from sftlab.train.stage import Stage


def declared_stage(module) -> tuple[str, Stage] | None:
    """(the module attribute's name, the Stage) a stage module declares, or None."""
    return next(((name, value) for name, value in vars(module).items() if isinstance(value, Stage)), None)


def is_stage_verb(verb: str) -> bool:
    """The verb that runs a stage: its module declares one, and the verb is that stage's (`sftlab data prepare`
    lives beside SFT's stage, but is not it)."""
    declared = declared_stage(importlib.import_module(cli.VERBS[verb].module))
    return declared is not None and stage_verb(declared[1].name) == f"sftlab {verb}"


STAGE_VERBS = [verb for verb in cli.VERBS if is_stage_verb(verb)]


def stage_module(verb: str):
    return importlib.import_module(cli.VERBS[verb].module)


def run_stage_verb(verb: str, out: Path, *extra: str) -> Path:
    """`sftlab VERB --config <its demo config> ...` on the tiny base, as the CLI calls it; returns the run folder."""
    entry, module = cli.VERBS[verb], stage_module(verb)
    config = re.search(r"--config (\S+)", entry.example).group(1)
    parsed = parse_verb(f"sftlab {verb}", module.ARGUMENTS, [
        "--config", str(REPO / config), "--model_name_or_path", "sftlab:tiny-glm4", "--output_dir", str(out),
        "--report_to", "none", "--max_steps", "6", "--save_steps", "3", "--eval_strategy", "no",
        "--logging_steps", "1", "--probe_prompts", "hi", "--probe_max_new_tokens", "2", "--final_eval_samples", "0",
        "--save_total_limit", "1", "--max_tokens_per_batch", "256", *extra])
    assert getattr(module, entry.function)(*parsed) == 0
    return out


def log_records(out: Path) -> list[dict]:
    changing = {"train_runtime", "train_samples_per_second", "train_steps_per_second"}
    return [{k: v for k, v in json.loads(line).items() if k not in changing}
            for line in (out / "trainer_log.jsonl").read_text().splitlines()]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module", params=STAGE_VERBS)
def straight(request, tmp_path_factory) -> tuple[str, Path]:
    """(the stage's verb, its uninterrupted run)."""
    return request.param, run_stage_verb(request.param, tmp_path_factory.mktemp(request.param) / "straight")


def kill_at(step: int):
    """ReliableTrainer.compute_loss (every stage's trainer class mixes it in first) raising Killed in step `step`."""
    def compute_loss(self, *args, **kwargs):
        if self.state.global_step == step - 1:
            raise Killed()
        return super(ReliableTrainer, self).compute_loss(*args, **kwargs)
    return compute_loss


def test_every_stage_verb_is_found():
    assert {"train", "dpo", "kto"} <= set(STAGE_VERBS)


@pytest.mark.slow  # in CI's whole run; kept out of the quick loop for its time
def test_a_killed_run_resumed_ends_bit_identical_to_an_uninterrupted_one(straight, tmp_path, monkeypatch):
    verb, uninterrupted = straight
    run = tmp_path / "run"
    monkeypatch.setattr(ReliableTrainer, "compute_loss", kill_at(5), raising=False)
    with pytest.raises(Killed):
        run_stage_verb(verb, run)
    monkeypatch.undo()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3"]
    run_stage_verb(verb, run, "--resume")
    assert sha256(run / "adapter_model.safetensors") == sha256(uninterrupted / "adapter_model.safetensors")
    assert log_records(run) == log_records(uninterrupted)
    assert [r["step"] for r in log_records(run)] == [1, 2, 3, 4, 5, 6, 6]


@pytest.mark.slow  # in CI's whole run; kept out of the quick loop for its time
def test_a_resume_that_changes_the_recipe_or_the_stage_is_refused_before_writing(straight, tmp_path):
    verb, uninterrupted = straight
    unfinished = killed_before_final_save(uninterrupted, tmp_path / "run")
    with pytest.raises(UserError, match=r"--resume with a changed recipe: learning_rate: .* -> 0\.5"):
        run_stage_verb(verb, unfinished, "--resume", "--learning_rate", "0.5")
    stage = declared_stage(stage_module(verb))[1].name
    for other in (v for v in STAGE_VERBS if v != verb):
        other_stage = declared_stage(stage_module(other))[1].name
        with pytest.raises(UserError) as error:
            run_stage_verb(other, unfinished, "--resume")
        assert (f"this run is {stage_title(stage)}; this command is for {stage_title(other_stage)} (resume it with "
                f"`{stage_verb(stage)}`)") in str(error.value)
    assert not (unfinished / "amendments.jsonl").exists() and not (unfinished / "adapter_config.json").exists()


def test_a_locked_folder_is_refused_naming_its_holder(tmp_path):
    for verb in STAGE_VERBS:
        out = tmp_path / verb
        holder = hold_lock(out, time.time(), 60)
        try:
            assert holder.stdout.readline() == "held\n"
            with pytest.raises(UserError, match=f"in use by another sftlab .*\\(PID {holder.pid}\\)"):
                run_stage_verb(verb, out)
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()


@pytest.mark.slow  # in CI's whole run; kept out of the quick loop for its time
@pytest.mark.parametrize("verb", STAGE_VERBS)
def test_a_non_finite_step_is_skipped_and_logged_and_the_run_goes_on(verb, tmp_path, monkeypatch):
    """The lifecycle's guard under each stage's trainer: step 2's loss made NaN is skipped (weights and optimizer
    untouched), counted in skipped_steps, and the run completes."""
    def nan_in_step_2(self, *args, **kwargs):
        loss = super(ReliableTrainer, self).compute_loss(*args, **kwargs)
        return loss * float("nan") if self.state.global_step == 1 else loss

    monkeypatch.setattr(ReliableTrainer, "compute_loss", nan_in_step_2, raising=False)
    out = run_stage_verb(verb, tmp_path / "run", "--max_steps", "4")
    records = [r for r in log_records(out) if "loss" in r]
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(1, 0), (2, 1), (3, 1), (4, 1)]
    assert is_complete(out)


@pytest.mark.slow  # in CI's whole run; kept out of the quick loop for its time
@pytest.mark.parametrize("verb", STAGE_VERBS)
def test_a_run_stopped_after_its_final_save_is_completed_by_resume_without_training(verb, tmp_path, monkeypatch):
    module = stage_module(verb)
    name, stage = declared_stage(module)

    def killed(*args, **kwargs):
        raise Killed()

    monkeypatch.setattr(module, name, dataclasses.replace(stage, finish=killed))
    with pytest.raises(Killed):
        run_stage_verb(verb, tmp_path / "run", "--max_steps", "3", "--final_eval_samples", "3")
    monkeypatch.undo()
    adapter = sha256(tmp_path / "run" / "adapter_model.safetensors")
    assert not is_complete(tmp_path / "run")
    monkeypatch.setattr(ReliableTrainer, "train", killed)  # completing must not train
    out = run_stage_verb(verb, tmp_path / "run", "--max_steps", "3", "--final_eval_samples", "3", "--resume")
    assert is_complete(out) and sha256(out / "adapter_model.safetensors") == adapter
    assert json.loads((out / "eval/results.json").read_text())["tuned"]["n"] == 3
