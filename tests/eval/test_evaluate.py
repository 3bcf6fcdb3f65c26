"""`sftlab eval` on a run: other data never replaces the held-out results, the reply limit is shown beside the
stop rate, and data with nothing usable is one clear error."""

import json
from pathlib import Path

import pytest

from helpers import REPO
from sftlab import cli
from sftlab.train.config import parse_args, reply_limit
from sftlab.train.sft import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    train(*parse_args(["--config", str(REPO / "configs/demo.yaml"), "--output_dir", str(out), "--report_to", "none",
                       "--max_steps", "2", "--save_steps", "2", "--eval_strategy", "no"]))
    return out


def test_training_derives_the_reply_limit_from_the_data_and_reports_it(run_dir):
    data_report = json.loads((run_dir / "data_report.json").read_text())
    limit = reply_limit(data_report)
    assert limit == max(32, 2 * data_report["tokens"]["response"]["p99"])
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["tuned"]["max_new_tokens"] == limit
    assert "| max_new_tokens | " in (run_dir / "eval" / "report.md").read_text()
    assert f"max_new_tokens            {limit}" in (run_dir / "report.md").read_text()


def test_the_run_records_what_the_optimizer_saw_per_step(run_dir):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    batches = manifest["batches"]
    assert (batches["micro_batches_per_epoch"], batches["optimizer_steps_per_epoch"]) == (8, 8)
    assert batches["padding_share"] == 0.0 and manifest["padding_free"] is True
    assert manifest["attention"] == "sdpa_varlen"
    assert f"- batches: {batches['summary']}" in (run_dir / "report.md").read_text()


def test_eval_on_other_data_goes_to_its_own_folder(run_dir, tmp_path, capsys):
    heldout = (run_dir / "eval" / "results.json").read_text()
    report = (run_dir / "report.md").read_text()
    other = tmp_path / "other_qa.jsonl"
    other.write_text('{"instruction": "你是谁？", "output": "我是灵犀。"}\n', encoding="utf-8")
    assert cli.main(["eval", "--adapter", str(run_dir), "--data", str(other), "--max_new_tokens", "4"]) == 0
    assert f"wrote {run_dir}/eval/other_qa/results.json" in capsys.readouterr().out
    assert json.loads((run_dir / "eval" / "other_qa" / "results.json").read_text())["tuned"]["n"] == 1
    assert (run_dir / "eval" / "results.json").read_text() == heldout
    assert (run_dir / "report.md").read_text() == report


def test_eval_on_data_with_nothing_usable_is_one_clear_error(run_dir, tmp_path, capsys):
    bad = tmp_path / "empty_rows.jsonl"
    bad.write_text('{"instruction": "", "output": "x"}\n{"instruction": "hi", "output": ""}\n', encoding="utf-8")
    code = cli.main(["eval", "--adapter", str(run_dir), "--data", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"sftlab eval: error: --data {bad}: no conversation to evaluate (2 rows read")


def test_chat_greedy_reply_equals_evals_reply(run_dir, capsys):
    """One rule for greedy decoding (no repetition penalty unless given) in chat and eval."""
    samples = [json.loads(line) for line in (run_dir / "eval" / "samples.jsonl").read_text().splitlines()]
    limit = json.loads((run_dir / "eval" / "results.json").read_text())["tuned"]["max_new_tokens"]
    for sample in samples[:3]:
        capsys.readouterr()
        assert cli.main(["chat", "--adapter", str(run_dir), "--prompt", sample["prompt"], "--temperature", "0",
                         "--json", "--max_new_tokens", str(limit)]) == 0
        reply = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert reply == {"reply": sample["tuned"]["reply"], "finish_reason": sample["tuned"]["finish_reason"],
                         "new_tokens": sample["tuned"]["new_tokens"]}


def test_eval_on_data_with_answer_rules_reports_answer_accuracy_at_the_runs_reply_limit(run_dir, tmp_path, capsys):
    """Rows may carry an answer rule (as the retention probes do): each reply is judged by it, the share is
    answer_accuracy; a row without one is not counted. No --max_new_tokens: the run's reply limit."""
    from sftlab.eval.retention import correct

    checks = tmp_path / "identity_checks.jsonl"
    rows = [{"instruction": "你是谁？", "output": "我是灵犀。", "any": ["灵犀", "Lingxi"]},
            {"instruction": "你叫什么名字？", "output": "我叫灵犀。", "all": ["never-in-a-reply-7"]},
            {"instruction": "1+1=?", "output": "2"}]
    checks.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert cli.main(["eval", "--adapter", str(run_dir), "--data", str(checks)]) == 0
    assert "answer_accuracy" in capsys.readouterr().out
    results = json.loads((run_dir / "eval" / "identity_checks" / "results.json").read_text())["tuned"]
    samples = [json.loads(line) for line in
               (run_dir / "eval" / "identity_checks" / "samples.jsonl").read_text().splitlines()]
    assert [s.get("answer_rule") for s in samples] == [{"any": ["灵犀", "Lingxi"]}, {"all": ["never-in-a-reply-7"]}, None]
    assert [s["tuned"].get("correct") for s in samples[1:]] == [False, None]
    assert samples[0]["tuned"]["correct"] == correct({"any": ["灵犀", "Lingxi"]}, samples[0]["tuned"]["reply"])
    assert results["answer_accuracy"] == samples[0]["tuned"]["correct"] / 2
    assert results["max_new_tokens"] == reply_limit(json.loads((run_dir / "data_report.json").read_text()))


def write_local_task(folder: Path) -> None:
    """An lm-eval task on a local file: two identical choices per question, so every model scores the first one
    highest (equal log-likelihoods) and the accuracy is the share of questions whose answer is the first: 3/4."""
    folder.mkdir()
    docs = [{"question": f"Q{i}", "choices": ["same", "same"], "answer": gold} for i, gold in enumerate([0, 0, 1, 0])]
    (folder / "qa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    (folder / "local_qa.yaml").write_text(
        "task: sftlab_local_qa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'qa.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n", encoding="utf-8")


@pytest.mark.slow
def test_eval_tasks_runs_lm_eval_on_base_and_tuned_and_adds_the_rows(run_dir, tmp_path, capsys):
    write_local_task(tmp_path / "tasks")
    out = tmp_path / "harness"
    assert cli.main(["eval", "--adapter", str(run_dir), "--compare-base", "--tasks", "sftlab_local_qa",
                     "--tasks_include", str(tmp_path / "tasks"), "--max_new_tokens", "4", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["base"]["tasks"] == results["tuned"]["tasks"] == {"sftlab_local_qa/acc": 0.75}
    assert results["tasks_higher_is_better"] == {"sftlab_local_qa/acc": True}
    assert "\nsftlab_local_qa/acc" + " " * 9 + "0.75" + " " * 8 + "0.75\n" in printed
    assert "| sftlab_local_qa/acc | 0.75 | 0.75 | +0 |" in (out / "report.md").read_text()


@pytest.mark.slow  # a measured 3-5 s: kept out of the quick loop
def test_eval_tasks_that_lm_eval_does_not_know_are_one_line(run_dir, tmp_path, capsys):
    code = cli.main(["eval", "--adapter", str(run_dir), "--tasks", "no_such_task_7", "--output", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.strip() == ("sftlab eval: error: --tasks: no lm-eval task named no_such_task_7 in "
                                               "lm-eval (a task of your own: --tasks_include DIR)")


def test_eval_on_other_data_asks_with_the_runs_system_prompt(run_dir, tmp_path, monkeypatch):
    """A run trained with system_prompt is asked the same way on any --data file, as chat and serve ask it."""
    import shutil

    import yaml

    from sftlab.eval import evaluate as module

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    record = yaml.safe_load((run / "sftlab_config.yaml").read_text())
    record["data"]["system_prompt"] = "你是灵犀。"
    (run / "sftlab_config.yaml").write_text(yaml.safe_dump(record, allow_unicode=True))
    other = tmp_path / "qa.jsonl"
    other.write_text('{"instruction": "你是谁？", "output": "我是灵犀。"}\n', encoding="utf-8")
    asked, evaluate = [], module.evaluate
    monkeypatch.setattr(module, "evaluate", lambda m, t, conversations, *a, **k: asked.append(conversations)
                        or evaluate(m, t, conversations, *a, **k))
    assert cli.main(["eval", "--adapter", str(run), "--data", str(other), "--max_new_tokens", "2"]) == 0
    assert asked == [[[{"role": "system", "content": "你是灵犀。"}, {"role": "user", "content": "你是谁？"},
                       {"role": "assistant", "content": "我是灵犀。"}]]]


def test_a_malformed_answer_rule_is_one_line_naming_the_file_line_and_field(run_dir, tmp_path, capsys):
    checks = tmp_path / "checks.jsonl"
    checks.write_text('{"instruction": "你是谁？", "output": "我是灵犀。", "any": ["灵犀"]}\n'
                      '{"instruction": "你叫什么？", "output": "灵犀。", "any": "灵犀"}\n', encoding="utf-8")
    assert cli.main(["eval", "--adapter", str(run_dir), "--data", str(checks)]) == 2
    assert capsys.readouterr().err.strip() == (f"sftlab eval: error: {checks}:2: field any: expected a non-empty list "
                                               "of strings, got '灵犀'")
