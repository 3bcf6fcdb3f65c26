"""Formats -> messages, and the golden rendering of a glaive-style tool-call row."""

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
    messages = to_messages(GLAIVE, "sharegpt")
    assert messages[0]["role"] == "system" and messages[0]["tools"][0]["function"]["name"] == "get_weather"
    assert messages[2] == {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'}
    text = mark_supervised(tokenizer, ChatRenderer(tokenizer).render(messages))
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
    messages = to_messages(row, "openai")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "observation", "assistant"]
    assert messages[2] == {"role": "assistant", "metadata": "now", "content": "{}"}


def test_prompt_completion():
    assert to_messages({"prompt": "a", "completion": "b"}, "prompt_completion") == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
