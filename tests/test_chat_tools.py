"""Tool calls in the forms templates take (chat_tools.py): parallel calls stay one turn in every form."""

import json

from sftlab.chat_tools import fallback_call, to_fallback_form, to_template_form

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {}}},
         {"type": "function", "function": {"name": "g", "parameters": {}}}]
PARALLEL = [{"role": "system", "content": "", "tools": TOOLS}, {"role": "user", "content": "go"},
            {"role": "assistant", "metadata": "f", "content": '{"x": 1}'},
            {"role": "assistant", "metadata": "g", "content": '{"y": 2}'},
            {"role": "observation", "content": "F done"}, {"role": "observation", "content": "G done"},
            {"role": "assistant", "content": "both done"}]


def test_openai_form_puts_parallel_calls_in_one_assistant_message():
    messages, tools = to_template_form(PARALLEL, tools_as_kwarg=True, openai_calls=True)
    assert tools == TOOLS
    assert messages == [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
            {"type": "function", "function": {"name": "g", "arguments": {"y": 2}}}]},
        {"role": "tool", "content": "F done"}, {"role": "tool", "content": "G done"},
        {"role": "assistant", "content": "both done"}]


def test_fallback_form_writes_parallel_calls_one_per_line_in_one_reply_and_names_each_result():
    messages = to_fallback_form(PARALLEL)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "user", "assistant"]
    assert messages[2]["content"].splitlines() == [json.dumps({"name": "f", "arguments": {"x": 1}}),
                                                   json.dumps({"name": "g", "arguments": {"y": 2}})]
    assert [messages[3]["content"], messages[4]["content"]] == ["Result of f: F done", "Result of g: G done"]
    assert fallback_call(messages[2]["content"]) == {"name": "f", "arguments": {"x": 1}}  # the first of them
