"""The retention check: answer rules, the shipped probe set, the verdict's thresholds, the record that eval
writes (worst probes, accuracy left out when the base knows too little), and `sftlab eval --compare_base` end to
end on the tiny model, with the shipped probes and with a user's own file. Whether it tells a destroyed real
model from a kept one is the slow test in test_real_recipes.py."""

import json
import re

import pytest

from helpers import REPO
from sftlab import cli
from sftlab.eval import retention
from sftlab.eval.retention import Probe, correct, shipped_probes, summarize, verdict, wilson_upper
from sftlab.infer.generate import Reply


@pytest.mark.parametrize("rule, reply, expected", [
    ({"any": ["5", "five"]}, "2 + 3 = 5.", True),
    ({"any": ["5", "five"]}, "The answer is 15.", False),  # a digit answer is a whole number, not part of one
    ({"any": ["5", "five"]}, "It is FIVE.", True),
    ({"any": ["C"]}, "The letter after B is C.", True),
    ({"any": ["C"]}, "Cats come after dogs.", False),
    ({"any": ["北京", "Beijing"]}, "中国的首都是北京。", True),
    ({"any": ["thank you", "thanks"]}, "Thanks!", True),
    ({"all": ["red", "yellow", "blue"]}, "Red, yellow and blue.", True),
    ({"all": ["red", "yellow", "blue"]}, "Red and blue.", False),
    ({"all": [["红", "red"], ["黄", "yellow"], ["蓝", "blue"]]}, "红、黄、蓝", True),
])
def test_answer_rules(rule, reply, expected):
    assert correct(rule, reply) is expected


def test_the_shipped_probes_are_sixty_half_chinese_each_with_a_rule():
    probes = shipped_probes()
    assert len(probes) == 60 and len({p.prompt for p in probes}) == 60
    assert all(p.rule and set(p.rule) <= {"any", "all"} for p in probes)
    assert sum(bool(re.search(r"[\u4e00-\u9fff]", p.prompt)) for p in probes) == 30


@pytest.mark.parametrize("retained, rise, accuracies, word", [
    (1.0, 0.0, None, "kept"), (0.8, 0.25, (0.5, 0.45), "kept"),  # the boundaries count as kept
    (0.79, 0.1, None, "degraded"), (1.0, 0.3, None, "degraded"), (0.5, 1.0, None, "degraded"),
    (0.85, 0.0, (0.5, 0.44), "degraded"),  # 88% of the base's accuracy
    (0.49, 0.1, None, "lost"), (1.0, 1.1, None, "lost"),
    (None, 0.2, None, "kept"), (None, 2.0, None, "lost"),  # no answer key: the loss rise alone
    # runs of benchmarks/retention_real.py and of the recipe search on SmolLM2-135M (docs/evaluation.md, "Retention")
    (1.0, -0.012, (0.2333, 0.3333), "kept"), (0.93, 0.003, (0.2333, 0.3833), "kept"),
    (0.71, 0.496, (0.2333, 0.3333), "degraded"), (0.57, 0.825, (0.2333, 0.2667), "degraded"),
    (0.43, 1.468, (0.2333, 0.3333), "lost"),
    (0.8636, -0.003, (0.3667, 0.3833), "kept"), (0.8636, 0.0158, (0.3667, 0.4), "kept"),
    (0.7778, 0.1843, (0.3, 0.3167), "degraded"),
])
def test_the_verdict_thresholds(retained, rise, accuracies, word):
    assert verdict(retained, rise, accuracies)[0] == word


def test_the_verdict_line_says_how_far_chance_reaches_without_moving_the_verdict():
    # a replay run's save (Kestrel, 120 steps): 16 of the base's 22 answers kept while the loss rise fell
    word, why = verdict(16 / 22, -0.109, (0.3667, 0.35), 22)
    assert word == "degraded" and why.startswith(
        "retained 73% of the 22 probes the base answers (kept >= 80%, lost < 50%, chance reaches 85%); ")


def test_the_wilson_upper_bound():
    assert wilson_upper(13 / 18, 18) == pytest.approx(0.8577, abs=1e-4)
    assert wilson_upper(1.0, 5) == pytest.approx(1.0) and wilson_upper(0.5, 0) == 1.0


def replies(*texts) -> list[Reply]:
    return [Reply(text, "stop", len(text)) for text in texts]


def test_the_record_names_the_worst_probes_first_those_the_tuned_model_forgot():
    probes = [Probe([{"role": "user", "content": f"q{i}"}], {"any": [str(i)]}) for i in range(7)]
    base, tuned = replies("0", "1", "2", "3", "4", "5", "x"), replies("0", "x", "2", "3", "4", "5", "6")
    record = summarize(probes, base, tuned, [1.0] * 7, [1.0, 1.2, 1.0, 3.0, 1.0, 1.1, 1.0])
    assert (record["base_accuracy"], record["tuned_accuracy"], record["retained"]) == (0.8571, 0.8571, 0.8333)
    assert record["loss_rise"] == pytest.approx(9.3 / 7 - 1.0, abs=1e-4)
    assert [w["prompt"] for w in record["worst"]] == ["q1", "q3", "q5"]  # forgotten first, then by loss rise
    # the same accuracy, but a probe the base knew was forgotten (and one it did not know was gained)
    assert record["verdict"] == "degraded" and record["why"] == (
        "retained 83% of the 6 probes the base answers (kept >= 80%, lost < 50%, chance reaches 96%); loss rise on "
        "the base's own replies "
        "+0.329 nats/token (kept <= 0.25, lost > 1.0); accuracy 86% -> 86% (kept: at least 90% of the base's)")
    assert [(p["prompt"], p["base_correct"], p["tuned_correct"]) for p in record["per_probe"]][5:] == [
        ("q5", True, True), ("q6", False, True)]


def test_no_verdict_when_the_base_knows_too_little():
    probes = [Probe([{"role": "user", "content": f"q{i}"}], {"any": ["yes"]}) for i in range(6)]
    base = replies("yes", "yes", "yes", "yes", "no", "no")
    assert retention.knows_too_little(probes, base) and not retention.knows_too_little(probes[:4] * 2, base[:4] * 2)
    record = retention.unknowing_base(probes, base)
    assert (record["verdict"], record["base_accuracy"], record["loss_rise"]) == ("n/a", 0.6667, None)
    assert record["why"] == ("the base answers only 4 of 6 general probes: it knows too little for a retention check "
                             "to mean anything")
    assert retention.retention_lines(record) == [f"retention: N/A: {record['why']} (6 general probes)"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from sftlab.train.config import parse_args
    from sftlab.train.sft import train

    out = tmp_path_factory.mktemp("retention") / "run"
    retention.MAX_NEW_TOKENS, limit = 4, retention.MAX_NEW_TOKENS  # the tiny model's replies are noise
    try:
        train(*parse_args(["--config", str(REPO / "configs/demo.yaml"), "--output_dir", str(out), "--report_to",
                           "none", "--max_steps", "2", "--save_steps", "2", "--eval_strategy", "no",
                           "--final_eval_samples", "2", "--final_eval_max_new_tokens", "4", "--probe_prompts", "hi",
                           "--probe_max_new_tokens", "1"]))
    finally:
        retention.MAX_NEW_TOKENS = limit
    return out


def test_the_runs_final_evaluation_checks_retention_and_reports_it(run_dir):
    record = json.loads((run_dir / "eval" / "results.json").read_text())["retention"]
    assert record["probes"] == 60 and record["verdict"] == "n/a"  # a random base knows nothing
    line = f"retention: {record['verdict'].upper()}: "
    assert line in (run_dir / "report.md").read_text() and line in (run_dir / "README.md").read_text()


def test_the_base_with_the_adapter_disabled_answers_as_the_base_itself(run_dir, monkeypatch):
    from peft import PeftModel

    from sftlab.model.load import adapter_base, load_for_inference

    monkeypatch.setattr(retention, "MAX_NEW_TOKENS", 6)
    probes = shipped_probes()[:8]
    base, tokenizer = load_for_inference(adapter_base(run_dir), device="cpu", dtype="float32")
    expected = [r.text for r in retention.answer(base, tokenizer, probes)]
    tuned, _ = load_for_inference(adapter=str(run_dir), device="cpu", dtype="float32")
    assert isinstance(tuned, PeftModel)
    with tuned.disable_adapter():
        assert [r.text for r in retention.answer(tuned, tokenizer, probes)] == expected


def test_eval_compare_base_checks_retention(run_dir, monkeypatch, capsys):
    monkeypatch.setattr(retention, "MAX_NEW_TOKENS", 4)  # the tiny model's replies are noise: short is enough
    assert cli.main(["eval", "--adapter", str(run_dir), "--compare_base", "--max_new_tokens", "4",
                     "--output", str(run_dir / "eval-retention")]) == 0
    out = capsys.readouterr().out
    record = json.loads((run_dir / "eval-retention" / "results.json").read_text())["retention"]
    assert (record["probes"], record["answer_keyed"]) == (60, 60)
    assert "per_probe" not in record  # every probe goes to its own file
    per_probe = [json.loads(line) for line in (run_dir / "eval-retention" / "retention.jsonl").read_text().splitlines()]
    assert len(per_probe) == 60 and set(per_probe[0]) == {"prompt", "base", "tuned", "base_correct", "tuned_correct",
                                                          "loss_rise"}
    assert record["verdict"] == "n/a" and record["worst"] == []
    assert f"retention: {record['verdict'].upper()}: " in out  # printed under the table
    report = (run_dir / "eval-retention" / "report.md").read_text()
    assert "## Retention (general probes, base vs tuned)" in report and f"retention: {record['verdict'].upper()}" in report


def test_a_users_own_retention_file_replaces_the_shipped_probes(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(retention, "MAX_NEW_TOKENS", 4)
    own = tmp_path / "general.jsonl"
    own.write_text("".join(json.dumps({"instruction": q, "output": a}, ensure_ascii=False) + "\n"
                           for q, a in [("天空是什么颜色？", "蓝色。"), ("Name a fruit.", "Apple.")]), encoding="utf-8")
    assert cli.main(["eval", "--adapter", str(run_dir), "--compare_base", "--max_new_tokens", "4",
                     "--retention_data", str(own), "--output", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "results.json").read_text())["retention"]
    assert (record["probes"], record["answer_keyed"], record["base_accuracy"]) == (2, 0, None)
    assert "retained" not in record["why"] and record["why"].startswith("loss rise on the base's own replies")


def test_retention_data_needs_compare_base(run_dir, tmp_path, capsys):
    assert cli.main(["eval", "--adapter", str(run_dir), "--retention_data", str(tmp_path / "x.jsonl")]) == 2
    assert "--retention_data needs --compare_base" in capsys.readouterr().err


def test_eval_on_a_model_folder_names_its_column_model(tiny_model_dir, tmp_path, capsys):
    assert cli.main(["eval", "--model", str(tiny_model_dir), "--data", str(REPO / "src/sftlab/data/demo/alpaca_demo.json"),
                     "--max_new_tokens", "2", "--output", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["metric", "model"]
    assert set(json.loads((tmp_path / "out" / "results.json").read_text())) == {"model"}
