"""Retention at saves (train/retention_guard.py): the check at every save logged and kept with its checkpoint,
retention_stop, and the final weights chosen by the stated rule. The tiny model knows too little to keep, so the
mechanism tests give its checks fixed verdicts; tests/train/test_real_recipes.py runs them on the real model."""

import json

import pytest
from safetensors.torch import load_file

from helpers import demo_args
from sftlab.eval import retention as retention_module
from sftlab.infer.generate import Reply
from sftlab.run_dir import RETENTION_BASE, RETENTION_RECORD, read_jsonl
from sftlab.train import retention_guard
from sftlab.train.checkpoints import commit, rotate
from sftlab.train.config import parse_args
from sftlab.train.retention_guard import RetentionAtSaves, eval_loss_at
from sftlab.train.sft import train


def guard_with(history: list[dict]) -> RetentionAtSaves:
    guard = RetentionAtSaves.__new__(RetentionAtSaves)
    guard.history = history
    return guard


def check(step, verdict, eval_loss):
    return {"step": step, "verdict": verdict, "retained": 1.0, "tuned_accuracy": 0.5, "loss_rise": 0.0,
            "eval_loss": eval_loss}


def test_the_best_checkpoint_is_the_lowest_held_out_loss_among_the_kept():
    assert guard_with([check(10, "kept", 1.2), check(20, "kept", 0.9), check(30, "degraded", 0.5),
                       check(40, "kept", 1.0)]).best() == "checkpoint-20"
    assert guard_with([check(10, "kept", None), check(20, "kept", None), check(30, "lost", None)]
                      ).best() == "checkpoint-20"  # no held-out loss: the latest kept
    assert guard_with([check(10, "kept", 0.9), check(20, "kept", 0.9)]).best() == "checkpoint-20"  # a tie: the later
    assert guard_with([check(10, "degraded", 0.9)]).best() is None
    choice = guard_with([check(10, "degraded", 0.9), check(20, "lost", 0.8)]).choice(last_step=25)
    assert (choice["checkpoint"], choice["step"], choice["retention"]) == (None, 25, "none kept")


def test_retention_stop_waits_for_patience_saves_in_a_row_unless_one_is_lost():
    def stops(verdicts, patience):
        guard = guard_with([check(10 * (i + 1), v, 1.0) for i, v in enumerate(verdicts)])
        guard.patience = patience
        return guard.should_stop()

    assert not stops(["kept", "degraded"], 2) and stops(["kept", "degraded"], 1)
    assert stops(["degraded", "degraded"], 2) and not stops(["degraded", "kept"], 2)
    assert not stops(["degraded", "kept", "degraded"], 2) and stops(["kept", "lost"], 2)
    assert not stops(["degraded"], 2)  # a first save alone is not yet patience saves


def test_the_held_out_loss_of_a_save_is_the_evaluation_at_its_step():
    history = [{"step": 5, "loss": 2.0}, {"step": 5, "eval_loss": 1.5}, {"step": 10, "eval_loss": 1.1},
               {"step": 10, "loss": 1.0}]
    assert eval_loss_at(history, 10) == 1.1 and eval_loss_at(history, 5) == 1.5 and eval_loss_at(history, 15) is None


def test_rotation_keeps_the_protected_checkpoint_besides_the_newest(tmp_path):
    for step in (3, 6, 9, 12):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "weights").write_text(str(step))
        commit(folder)
        rotate(tmp_path, 1, folder, protect="checkpoint-6")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-12", "checkpoint-6"]


def test_a_save_records_the_answers_that_changed_both_ways():
    from sftlab.eval.retention import Probe

    probes = [Probe([{"role": "user", "content": f"q{i}"}], {"any": [str(i)]}) for i in range(4)]
    base = [Reply(t, "stop", 1) for t in ("0", "1", "x", "x")]
    tuned = [Reply(t, "stop", 1) for t in ("0", "y", "2", "x")]
    summary = retention_module.summarize(probes, base, tuned, [1.0] * 4, [1.0] * 4)
    assert retention_guard.changed_answers(summary) == [
        {"prompt": "q1", "lost": True, "base": "1", "tuned": "y"},
        {"prompt": "q2", "lost": False, "base": "x", "tuned": "2"}]


@pytest.fixture
def fixed_verdicts(monkeypatch):
    """The checks at saves say kept, kept, degraded, ... in turn (the tiny base would otherwise be n/a)."""
    verdicts = iter(["kept", "kept", "degraded", "degraded"])
    real = retention_module.summarize

    def summarize(*args):
        record = real(*args)
        return {**record, "verdict": next(verdicts)}

    monkeypatch.setattr(retention_guard, "knows_too_little", lambda probes, replies: False)
    monkeypatch.setattr(retention_guard, "summarize", summarize)


@pytest.mark.slow
def test_a_degraded_save_ends_the_run_and_the_best_kept_checkpoint_becomes_final(tmp_path, fixed_verdicts, capsys):
    out = tmp_path / "run"
    train(*parse_args(demo_args(out, "--max_steps", "12", "--save_steps", "3", "--eval_steps", "3",
                                "--save_total_limit", "1", "--retention_at_saves", "true", "--retention_patience", "1",
                                "--final_eval_samples", "0",
                                "--probe_prompts", "你是谁？")))
    printed = capsys.readouterr().out
    logs = read_jsonl(out / "trainer_log.jsonl")
    checks = [r for r in logs if "retention/verdict" in r]
    assert [(r["step"], r["retention/verdict"]) for r in checks] == [(3, "kept"), (6, "kept"), (9, "degraded")]
    assert "retention_stop: retention is degraded at step 9: ending the run after this checkpoint" in printed
    losses = {step: next(r["eval_loss"] for r in logs if r.get("step") == step and "eval_loss" in r) for step in (3, 6)}
    best = min(losses, key=lambda step: (losses[step], -step))
    assert [r["retention/eval_loss"] for r in checks[:2]] == [losses[3], losses[6]]

    # the run stopped at 9; the best kept checkpoint survived rotation beside the newest; its weights are final
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 9
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted({f"checkpoint-{best}", "checkpoint-9"})
    final, chosen = (load_file(path / "adapter_model.safetensors") for path in (out, out / f"checkpoint-{best}"))
    assert final.keys() == chosen.keys() and all((final[k] == chosen[k]).all() for k in final)
    assert json.loads((out / f"checkpoint-{best}" / RETENTION_RECORD).read_text())["verdict"] == "kept"
    assert json.loads((out / RETENTION_BASE).read_text())["replies"][0].keys() == {"text", "finish_reason",
                                                                                   "new_tokens"}

    manifest = json.loads((out / "manifest.json").read_text())["final_weights"]
    assert (manifest["checkpoint"], manifest["step"], manifest["retention"]) == (f"checkpoint-{best}", best, "kept")
    assert [c["step"] for c in manifest["checks"]] == [3, 6, 9]
    line = f"Final weights: checkpoint-{best} (step {best}, retention kept), chosen by the rule: lowest held-out loss"
    assert line in (out / "report.md").read_text() and line in (out / "README.md").read_text()
    assert "## Retention at saves and the final weights" in (out / "report.md").read_text()


def test_without_retention_at_saves_nothing_is_checked_or_chosen(trained_run):
    from helpers import TRAINED

    run = trained_run(*TRAINED)
    assert not (run / RETENTION_BASE).exists()
    assert "final_weights" not in json.loads((run / "manifest.json").read_text()) or \
        json.loads((run / "manifest.json").read_text())["final_weights"] is None
    assert not any("retention/verdict" in r for r in read_jsonl(run / "trainer_log.jsonl"))
