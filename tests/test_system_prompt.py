"""A chat template's default system prompt (SmolLM2's ChatML adds "You are a helpful AI assistant named SmolLM,
..." to every conversation without one) is found by the renderer, reported by `data inspect`, the data report
and the run's summary, and `system_prompt` chooses: unset keeps it, "" keeps it out, text replaces it. The run
records the choice, and chat, the probes and serve apply it to conversations without a system message."""

import json

import pytest

from sftlab import cli
from sftlab.chat_format import ChatRenderer
from sftlab.config import CleanArguments
from sftlab.data.cleaner import clean_rows
from sftlab.data.convert import to_messages
from sftlab.data.load import SourceRow
from sftlab.data.report import build_report, summary_line
from sftlab.model.load import load_tokenizer, with_system_prompt
from sftlab.model.tiny import FAMILIES
from sftlab.run_dir import recorded_system_prompt

DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# SmolLM2-135M-Instruct's template, as its GGUF file carries it
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    + DEFAULT + "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chatml_with_default(sftlab_home):
    """The tiny Qwen3 tokenizer (ChatML tokens) with SmolLM2's template: a template that has a default."""
    from sftlab.model.tiny import ensure_tiny_model

    tokenizer = load_tokenizer(ensure_tiny_model("sftlab:tiny-qwen3"))
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_embedded_families_have_no_default_system_prompt(name, sftlab_home):
    from sftlab.model.tiny import ensure_tiny_model

    assert ChatRenderer(load_tokenizer(ensure_tiny_model(name))).default_system is None  # Llama-3.1's dates are not one


def test_a_template_default_is_found(chatml_with_default):
    assert ChatRenderer(chatml_with_default).default_system == DEFAULT


ROW = {"instruction": "你是谁？", "input": "", "output": "我是灵犀。"}


@pytest.mark.parametrize("system_prompt, rendered_system", [
    (None, DEFAULT),  # unset: the template's default is trained in
    ("", ""),  # an empty system message: the default is kept out
    ("你是灵犀。", "你是灵犀。"),
])
def test_system_prompt_chooses_what_the_model_is_trained_with(chatml_with_default, system_prompt, rendered_system):
    renderer = ChatRenderer(chatml_with_default)
    for row in (ROW, {"conversations": [{"from": "human", "value": "你是谁？"}, {"from": "gpt", "value": "我是灵犀。"}]},
                {"messages": [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是灵犀。"}]}):
        fmt = {"instruction": "alpaca", "conversations": "sharegpt", "messages": "openai"}[next(iter(row))]
        text = renderer.render_text(*to_messages(row, fmt, system_prompt))
        assert text == (f"<|im_start|>system\n{rendered_system}<|im_end|>\n<|im_start|>user\n你是谁？<|im_end|>\n"
                        "<|im_start|>assistant\n我是灵犀。<|im_end|>\n")


def test_a_rows_own_system_message_wins(chatml_with_default):
    messages, _ = to_messages({**ROW, "system": "你是助手。"}, "alpaca", "")
    assert messages[0] == {"role": "system", "content": "你是助手。"}


def test_the_report_says_which_rows_get_the_default(chatml_with_default):
    renderer = ChatRenderer(chatml_with_default, 256)
    rows = [SourceRow("d.jsonl", 1, ROW), SourceRow("d.jsonl", 2, {**ROW, "instruction": "你好", "system": "简短回答。"})]
    report = build_report(clean_rows(rows, CleanArguments(), renderer), ["d.jsonl"], 256, "chatml",
                          renderer.default_system)
    assert report["template_system_prompt"] == {"text": DEFAULT, "rows": 1}
    assert summary_line(report).endswith(
        f"; the chat template adds its default system prompt {DEFAULT!r} to the 1 kept rows without one, and they "
        "are trained with it (system_prompt: \"\" keeps it out, or give your own)")
    kept_out = clean_rows(rows, CleanArguments(), renderer, system_prompt="")
    report = build_report(kept_out, ["d.jsonl"], 256, "chatml", renderer.default_system)
    assert report["template_system_prompt"]["rows"] == 0 and "default system prompt" not in summary_line(report)
    without = build_report(clean_rows(rows, CleanArguments(), renderer), ["d.jsonl"], 256, "chatml", None)
    assert "template_system_prompt" not in without


def test_data_inspect_names_the_default(chatml_with_default, tmp_path, capsys):
    folder = tmp_path / "model"
    chatml_with_default.save_pretrained(folder)
    (folder / "config.json").write_text("{}")  # a model folder, as far as the tokenizer is concerned
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(ROW, ensure_ascii=False) + "\n", encoding="utf-8")
    assert cli.main(["data", "inspect", str(data), "--model", str(folder)]) == 0
    assert (f"system prompt: the chat template adds its default {DEFAULT!r} to every conversation without a system "
            "message (1 of 1 here); --system_prompt \"\" keeps it out, or give your own") in capsys.readouterr().out


@pytest.mark.parametrize("recorded", [None, "", "你是灵犀。"])
def test_the_runs_choice_is_read_back_and_applied(tmp_path, recorded):
    (tmp_path / "sftlab_config.yaml").write_text(json.dumps({"data": {"system_prompt": recorded}}))
    assert recorded_system_prompt(tmp_path) == recorded
    user = [{"role": "user", "content": "你是谁？"}]
    expected = user if recorded is None else [{"role": "system", "content": recorded}, *user]
    assert with_system_prompt(user, recorded_system_prompt(tmp_path)) == expected
    own = [{"role": "system", "content": "mine"}, *user]
    assert with_system_prompt(own, recorded) == own
    assert recorded_system_prompt(tmp_path / "no-run") is None and recorded_system_prompt(None) is None
