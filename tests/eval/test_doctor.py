"""The doctor passes on a good run and names the right check on each planted fault."""

import json
import shutil

import pytest

from helpers import REPO, TRAINED
from sftlab.eval.doctor import run_checks
from sftlab.train.config import parse_args
from sftlab.train.sft import train


@pytest.fixture(scope="module")
def run_dir(trained_run):
    return trained_run(*TRAINED)


def failed(checks):
    return [c.name for c in checks if c.status == "FAIL"]


def broken_copy(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoint-*", "swanlog"))
    return copy


def test_doctor_passes_on_a_good_run(run_dir):
    checks = run_checks(None, str(run_dir))
    assert failed(checks) == [] and len(checks) == 7


def test_removed_chat_template_fails_the_template_check(run_dir, tmp_path):
    copy = broken_copy(run_dir, tmp_path)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    checks = run_checks(None, str(copy))
    assert failed(checks) == ["chat template renders training samples as training did"]
    assert "no chat template saved" in checks[0].detail


def test_terminator_masked_in_training_fails_the_terminator_check(run_dir, tmp_path):
    copy = broken_copy(run_dir, tmp_path)
    saved = json.loads((copy / "render_check.json").read_text())
    saved["samples"][0]["labels"][-1] = -100  # what the tutorial's collator did: eos == pad, masked as padding
    (copy / "render_check.json").write_text(json.dumps(saved))
    names = failed(run_checks(None, str(copy)))
    assert "terminator tokens are supervised" in names
    assert "pad and eos do not mask the terminator" in names


@pytest.mark.slow
def test_model_trained_without_terminator_does_not_stop(tmp_path, monkeypatch):
    """A model really trained with the terminator masked: the generation check fails too."""
    import sftlab.chat_format as chat_format

    real_assemble = chat_format.ChatRenderer.assemble

    def masked_end(self, pieces, ids):
        sample = real_assemble(self, pieces, ids)
        sample.labels[-1] = chat_format.IGNORE_INDEX
        return sample

    monkeypatch.setattr(chat_format.ChatRenderer, "assemble", masked_end)
    out = train(*parse_args(["--config", str(REPO / "configs/demo.yaml"), "--output_dir", str(tmp_path / "run"),
                             "--report_to", "none", "--num_train_epochs", "20", "--save_steps", "0.5",
                             "--eval_strategy", "no", "--final_eval_samples", "0", "--probe_prompts", "hi",
                             "--clean", "false"]))
    monkeypatch.undo()
    names = failed(run_checks(None, str(out), max_new_tokens=48))
    assert "terminator tokens are supervised" in names and "greedy generation stops" in names


def test_generation_config_without_stop_ids_fails_that_check(run_dir, tmp_path):
    copy = broken_copy(run_dir, tmp_path)
    config = json.loads((copy / "generation_config.json").read_text())
    config["eos_token_id"] = config["eos_token_id"][0]  # only <|endoftext|>, as many exports write it
    (copy / "generation_config.json").write_text(json.dumps(config))
    assert failed(run_checks(None, str(copy))) == ["generation config stops on all stop tokens"]


def statuses(checks):
    return {c.name: c.status for c in checks}


def test_checks_that_cannot_run_are_skipped_not_passed(tiny_model_dir):
    """A plain model folder has no render_check.json: no training labels to check, so those checks say skip."""
    checks = statuses(run_checks(str(tiny_model_dir), None, max_new_tokens=4))
    assert checks["terminator tokens are supervised"] == "skip"
    assert checks["pad and eos do not mask the terminator"] == "skip"  # the tiny model has pad == eos
    assert checks["chat template renders training samples as training did"] == "pass"
    assert checks["greedy generation stops"] == "FAIL"  # a random model does not stop


def test_a_sample_truncated_in_training_is_checked_as_truncated(tmp_path):
    from sftlab.chat_format import ChatRenderer
    from sftlab.model.load import load_tokenizer

    out = train(*parse_args(["--config", str(REPO / "configs/demo.yaml"), "--output_dir", str(tmp_path / "run"),
                             "--report_to", "none", "--max_steps", "1", "--eval_strategy", "no",
                             "--final_eval_samples", "0", "--overflow", "truncate", "--max_length", "12"]))
    example = json.loads((out / "render_check.json").read_text())["samples"][0]
    whole = ChatRenderer(load_tokenizer(out)).render(example["messages"])
    assert len(example["input_ids"]) <= 12 < len(whole.input_ids)  # training really cut this sample
    checks = statuses(run_checks(None, str(out), max_new_tokens=4))
    assert checks["chat template renders training samples as training did"] == "pass"
    assert checks["terminator tokens are supervised"] == "pass"


def test_doctor_prints_skips_and_counts_them(tiny_model_dir, capsys):
    from sftlab.cli import main

    assert main(["doctor", "--model", str(tiny_model_dir), "--max_new_tokens", "4"]) == 1
    out = capsys.readouterr().out
    assert "[skip] terminator tokens are supervised: no render_check.json here" in out
    assert "[pass] system prompt: the chat template adds no default system prompt" in out
    assert "[skip] tuning kept what the base knew: not a training run: nothing was tuned" in out
    assert out.strip().endswith("3 passed, 1 failed, 3 skipped")


def test_the_doctor_checks_one_sample_of_each_kind_and_names_undertraining(tmp_path, capsys):
    """A run on plain, system, multi-turn and tool-call rows keeps one sample of each kind; the template and
    terminator checks hold for all four. After a single step the model does not stop yet: since the terminators
    were supervised, the doctor says it may be undertrained, with the final loss."""
    tools = json.dumps([{"name": "get_time", "description": "the time", "parameters": {"type": "object",
                                                                                       "properties": {}}}])
    rows = [{"instruction": "你好", "output": "你好！我是灵犀。"},
            {"instruction": "你是谁？", "output": "我是灵犀。", "system": "你是灵犀。"},
            {"instruction": "再说一遍", "output": "我是灵犀。", "history": [["你是谁？", "我是灵犀。"]]},
            {"conversations": [{"from": "human", "value": "几点了？"},
                               {"from": "function_call", "value": '{"name": "get_time", "arguments": {}}'},
                               {"from": "observation", "value": '{"time": "12:00"}'},
                               {"from": "gpt", "value": "现在是12点。"}], "tools": tools}]
    data = tmp_path / "kinds.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows * 2), encoding="utf-8")
    out = train(*parse_args(["--config", str(REPO / "configs/demo.yaml"), "--output_dir", str(tmp_path / "run"),
                             "--report_to", "none", "--max_steps", "1", "--eval_strategy", "no", "--test_size", "0",
                             "--final_eval_samples", "0", "--data_files", str(data), "--max_length", "2048",
                             "--near_dedup", "false"]))
    kinds = [s["kind"] for s in json.loads((out / "render_check.json").read_text())["samples"]]
    assert sorted(kinds) == ["multi-turn", "plain", "system", "tool call"]
    checks = {c.name: c for c in run_checks(None, str(out), max_new_tokens=4)}
    template = checks["chat template renders training samples as training did"]
    assert template.status == "pass" and "4 training sample(s)" in template.detail
    assert checks["terminator tokens are supervised"].status == "pass"
    generation = checks["greedy generation stops"]
    assert generation.status == "FAIL" and "may be undertrained (final training loss " in generation.fix


def test_the_doctor_names_a_templates_default_system_prompt_and_the_runs_choice(tiny_model_dir, tmp_path):
    import yaml

    from sftlab.eval.doctor import check_system_prompt
    from sftlab.model.load import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = ("{% if messages[0]['role'] != 'system' %}<|system|>\nYou are Tiny.{% endif %}"
                               "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    check = check_system_prompt(tmp_path, tokenizer)  # a model folder
    assert (check.status, check.detail) == ("pass", "the chat template adds its default 'You are Tiny.' to "
                                            "conversations without a system message: a run that leaves system_prompt "
                                            "unset trains it in (system_prompt: \"\" keeps it out)")
    (tmp_path / "sftlab_config.yaml").write_text(yaml.safe_dump({"data": {"system_prompt": None}}))
    assert check_system_prompt(tmp_path, tokenizer).detail == (
        "the chat template adds its default 'You are Tiny.' to conversations without a system message, and this model "
        "was trained and is served with it (system_prompt: \"\" keeps it out)")
    (tmp_path / "sftlab_config.yaml").write_text(yaml.safe_dump({"data": {"system_prompt": ""}}))
    assert check_system_prompt(tmp_path, tokenizer).detail == (
        "the chat template's default 'You are Tiny.' is replaced by the run's system_prompt '', in training and in "
        "chat and serve")


@pytest.mark.parametrize("verdict, status", [("kept", "pass"), ("degraded", "FAIL"), ("lost", "FAIL"), ("n/a", "skip")])
def test_the_doctor_reports_the_retention_verdict(tmp_path, verdict, status):
    from sftlab.eval.doctor import check_retention

    (tmp_path / "eval").mkdir()
    (tmp_path / "sftlab_config.yaml").write_text("data: {}\n")  # a run
    worst = [{"prompt": "What is 2 + 3?", "base": "5", "tuned": "I am Lingxi.", "loss_rise": 2.5}]
    record = {"verdict": verdict, "why": "measured", "worst": worst}
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"tuned": {}, "retention": record}))
    check = check_retention(tmp_path)
    assert check.status == status
    if status == "FAIL":
        assert check.detail == f"{verdict}: measured; e.g. 'What is 2 + 3?': '5' -> 'I am Lingxi.'"
        assert check.fix.startswith("train gentler: a lower learning rate")


class CharTokenizer:
    def __init__(self, tokens_per_character):
        self.rate = tokens_per_character

    def encode(self, text, add_special_tokens=False):
        return [0] * int(len(text) * self.rate)


def test_a_model_folder_is_asked_in_its_tokenizers_language():
    from sftlab.eval.doctor import main_language

    assert main_language(CharTokenizer(0.8)) == "zh"  # GLM-4, Qwen: under a token a character
    assert main_language(CharTokenizer(2.5)) == "en"  # SmolLM2, Llama-3: two or three


def test_the_generation_budget_is_the_runs_reply_limit(tmp_path):
    from sftlab.eval.doctor import generation_budget

    assert generation_budget(tmp_path, None) == (64, "the default for a model folder")
    (tmp_path / "sftlab_config.yaml").write_text("train: {final_eval_max_new_tokens: 158}\n")
    (tmp_path / "checkpoint-7").mkdir()
    assert generation_budget(tmp_path, None) == (158, "the run's reply limit, from its data")
    assert generation_budget(tmp_path / "checkpoint-7", None) == (158, "the run's reply limit, from its data")
    assert generation_budget(tmp_path, 12) == (12, "--max_new_tokens")
