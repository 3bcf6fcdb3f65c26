"""Formats -> conversations in OpenAI's form (messages, tools), and the golden rendering of a glaive-style
tool-call row in GLM-4's dialect."""

import json

from sftlab.chat_format import ChatRenderer, mark_supervised
from sftlab.data.convert import detect_format, to_messages

GLAIVE = {
    "conversations": [
        {"from": "human", "value": "北京天气怎么样？"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "北京"}}'},
        {"from": "observation", "value": '{"temp": 20}'},
        {"from": "gpt", "value": "北京现在20度。"},
    ],
    "tools": json.dumps([{"name": "get_weather", "description": "查询天气",
                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
                        ensure_ascii=False),
}


def test_formats_are_detected():
    assert detect_format({"instruction": "a", "output": "b"}) == "alpaca"
    assert detect_format(GLAIVE) == "sharegpt"
    assert detect_format({"messages": []}) == "openai"
    assert detect_format({"prompt": "a", "completion": "b"}) == "prompt_completion"
    assert detect_format({"text": "a"}) is None


def test_glaive_tool_call_row_renders_tools_in_the_system_message_and_masks_observations(tokenizer):
    messages, tools = to_messages(GLAIVE, "sharegpt")
    assert tools[0]["function"]["name"] == "get_weather" and messages[0]["role"] == "user"
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]}
    assert messages[2] == {"role": "tool", "content": '{"temp": 20}'}
    text = mark_supervised(tokenizer, ChatRenderer(tokenizer).render(messages, tools))
    tools_block = text[:text.index("<|user|>")]
    assert tools_block.startswith("[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手。")
    # transformers renders templates with trim_blocks, which eats the first newline after a {% %} tag
    assert "# 可用工具\n## get_weather\n\n{\n    \"name\": \"get_weather\",\n    \"description\": \"查询天气\"" in tools_block
    assert "«" not in tools_block  # the system message and its tools are not supervised
    assert text[text.index("<|user|>"):] == (
        "<|user|>\n北京天气怎么样？<|assistant|>«get_weather\n{\"city\": \"北京\"}<|observation|>»"
        "\n{\"temp\": 20}<|assistant|>«\n北京现在20度。<|endoftext|>»")


def test_openai_messages_with_tool_calls():
    row = {"messages": [{"role": "user", "content": "time?"},
                        {"role": "assistant", "tool_calls": [{"function": {"name": "now", "arguments": "{}"}}]},
                        {"role": "tool", "content": "12:00"}, {"role": "assistant", "content": "Noon."}],
           "tools": [{"type": "function", "function": {"name": "now"}}]}
    messages, tools = to_messages(row, "openai")
    assert tools == row["tools"] and [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "now", "arguments": {}}}]}  # the arguments parsed


def test_glm4_form_rows_are_read_into_openais_form():
    """A row in GLM-4's own form (a run's heldout.jsonl from before, or GLM-4 data): the same conversation."""
    tools = [{"type": "function", "function": {"name": "now"}}]
    row = {"messages": [{"role": "system", "content": "", "tools": tools}, {"role": "user", "content": "time?"},
                        {"role": "assistant", "metadata": "now", "content": "{}"},
                        {"role": "assistant", "metadata": "tz", "content": '{"city": "巴黎"}'},
                        {"role": "observation", "content": "12:00"}, {"role": "observation", "content": "CET"},
                        {"role": "assistant", "content": "Noon."}]}
    messages, read_tools = to_messages(row, "openai")
    assert read_tools == tools and messages == [
        {"role": "user", "content": "time?"},
        {"role": "assistant", "content": "", "tool_calls": [  # consecutive calls: parallel, one turn
            {"type": "function", "function": {"name": "now", "arguments": {}}},
            {"type": "function", "function": {"name": "tz", "arguments": {"city": "巴黎"}}}]},
        {"role": "tool", "content": "12:00"}, {"role": "tool", "content": "CET"},
        {"role": "assistant", "content": "Noon."}]


def test_prompt_completion():
    assert to_messages({"prompt": "a", "completion": "b"}, "prompt_completion") == (
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], None)
