"""`sftlab eval` on a run: other data never replaces the held-out results, the reply limit is shown beside the
stop rate, and data with nothing usable is one clear error."""

import json
from pathlib import Path

import pytest

from sftlab import cli
from sftlab.train.sft import parse_args, reply_limit, train

REPO = Path(__file__).resolve().parents[2]


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
