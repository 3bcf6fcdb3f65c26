"""Golden renderings with GLM-4's fine-tuning mask: «» marks the supervised tokens."""

import pytest

from sftlab.chat_format import IGNORE_INDEX, ChatRenderer, MessageError, SampleTooLong, mark_supervised, stop_token_ids
from sftlab.chat_tools import function_call, validate_messages
from sftlab.data.convert import alpaca_to_messages


def render(tokenizer, messages, **kwargs):
    return ChatRenderer(tokenizer, **kwargs).render(messages)


def test_single_turn_golden_ids_and_labels(tokenizer):
    sample = render(tokenizer, alpaca_to_messages({"instruction": "你是谁？", "input": "", "output": "我是灵犀。"}))
    gmask, sop, user, assistant, eot = (tokenizer.convert_tokens_to_ids(t) for t in
                                        ("[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|endoftext|>"))
    assert sample.input_ids == [gmask, sop, user, 198, 644, 265, assistant, 198, 523, 258, eot]
    assert sample.labels == [IGNORE_INDEX] * 7 + [198, 523, 258, eot]
    assert mark_supervised(tokenizer, sample) == "[gMASK]<sop><|user|>\n你是谁？<|assistant|>«\n我是灵犀。<|endoftext|>»"


def test_turn_with_input_joins_instruction_and_input_with_a_blank_line(tokenizer):
    messages = alpaca_to_messages({"instruction": "Translate.", "input": "猫", "output": "Cat."})
    assert messages[0] == {"role": "user", "content": "Translate.\n\n猫"}
    assert mark_supervised(tokenizer, render(tokenizer, messages)) == (
        "[gMASK]<sop><|user|>\nTranslate.\n\n猫<|assistant|>«\nCat.<|endoftext|>»")


def test_system_prompt_is_rendered_and_not_supervised(tokenizer):
    messages = alpaca_to_messages({"instruction": "Hi", "output": "Hello!"}, system_prompt="Be brief.")
    assert mark_supervised(tokenizer, render(tokenizer, messages)) == (
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>«\nHello!<|endoftext|>»")


def test_row_system_field_wins_over_the_default_system_prompt(tokenizer):
    messages = alpaca_to_messages({"instruction": "Hi", "output": "Yo", "system": "Row."}, system_prompt="Default.")
    assert messages[0] == {"role": "system", "content": "Row."}


def test_multi_turn_supervises_every_assistant_turn_and_its_terminator(tokenizer):
    messages = [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": "3"},
                {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert mark_supervised(tokenizer, render(tokenizer, messages)) == (
        "[gMASK]<sop><|user|>\n1+2?<|assistant|>«\n3<|user|>»\n2+2?<|assistant|>«\n4<|endoftext|>»")


def test_alpaca_history_becomes_earlier_turns(tokenizer):
    messages = alpaca_to_messages({"instruction": "2+2?", "output": "4", "history": [["1+2?", "3"]]})
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]


def test_tool_call_and_observation_turns(tokenizer):
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {}}}]
    messages = [{"role": "user", "content": "time?"},
                {"role": "assistant", "content": "", "tool_calls": [function_call("get_time", {})]},
                {"role": "tool", "content": "12:00"}, {"role": "assistant", "content": "It is 12:00."}]
    text = mark_supervised(tokenizer, ChatRenderer(tokenizer).render(messages, tools))
    assert text.startswith("[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手。")
    assert '## get_time\n\n{\n    "name": "get_time",\n    "parameters": {}\n}\n在调用上述函数时，请使用 Json 格式表示调用的参数。' in text
    assert text.endswith("<|user|>\ntime?<|assistant|>«get_time\n{}<|observation|>»\n12:00<|assistant|>"
                         "«\nIt is 12:00.<|endoftext|>»")


def test_gmask_sop_appears_exactly_once(tokenizer):
    sample = render(tokenizer, alpaca_to_messages({"instruction": "a", "output": "b"}))
    gmask = tokenizer.convert_tokens_to_ids("[gMASK]")
    assert sample.input_ids.count(gmask) == 1 and sample.input_ids[0] == gmask


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "你好，告诉我你的名字。"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "告诉我1+2等于多少？"}],
])
def test_prompt_equals_apply_chat_template_token_for_token(tokenizer, messages):
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ChatRenderer(tokenizer).prompt_ids(messages) == expected


def test_training_sample_starts_with_the_generation_prompt(tokenizer):
    messages = alpaca_to_messages({"instruction": "你是谁？", "output": "我是灵犀。"})
    prompt = ChatRenderer(tokenizer).prompt_ids(messages[:1])
    sample = render(tokenizer, messages)
    assert sample.input_ids[:len(prompt)] == prompt
    assert all(label == IGNORE_INDEX for label in sample.labels[:len(prompt)])


def test_too_long_sample_is_dropped_not_emptied(tokenizer):
    messages = alpaca_to_messages({"instruction": "x" * 40, "output": "ok"})
    full = render(tokenizer, messages)
    with pytest.raises(SampleTooLong):
        render(tokenizer, messages, max_length=len(full.input_ids) - 1)
    assert render(tokenizer, messages, max_length=len(full.input_ids)).input_ids == full.input_ids


def test_truncate_keeps_part_of_the_answer_and_its_terminator(tokenizer):
    messages = alpaca_to_messages({"instruction": "Hi", "output": "Hello! " * 10})
    full = render(tokenizer, messages)
    sample = render(tokenizer, messages, max_length=len(full.input_ids) - 5, overflow="truncate")
    assert len(sample.input_ids) == len(full.input_ids) - 5
    assert sample.input_ids[-1] == tokenizer.eos_token_id and sample.labels[-1] == tokenizer.eos_token_id
    assert sample.input_ids[:-1] == full.input_ids[:len(sample.input_ids) - 1]
    assert sample.num_supervised >= 2


def test_truncate_drops_a_sample_whose_prompt_fills_max_length(tokenizer):
    messages = alpaca_to_messages({"instruction": "long " * 30, "output": "ok"})
    with pytest.raises(SampleTooLong):
        render(tokenizer, messages, max_length=10, overflow="truncate")


@pytest.mark.parametrize("messages, field", [
    ([{"role": "assistant", "content": "hi"}], "first non-system message must be a user"),
    ([{"role": "user", "content": "hi"}], "must end with the assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}], "messages[1].content: empty"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "messages[1].role"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}], "messages[0].content"),
])
def test_malformed_conversations_name_the_message(tokenizer, messages, field):
    with pytest.raises(MessageError, match=field.replace("[", r"\[").replace("]", r"\]")):
        render(tokenizer, messages)


def test_stop_ids_are_glm4s_three(tokenizer):
    assert stop_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids(t)
                                         for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]


# A ChatML template (Qwen2.5's, without its tool and system defaults): the template itself ends each turn
CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' "
          "+ '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


@pytest.fixture
def chatml_tokenizer(tiny_model_dir):
    from sftlab.model.load import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def test_a_template_that_ends_turns_supervises_its_end_token_and_nothing_after(chatml_tokenizer):
    """One terminator rule: ChatML writes <|im_end|> after each reply. It is supervised (the model learns to stop),
    the newline after it and the next <|im_start|> are not, and no eos is appended."""
    tok = chatml_tokenizer
    messages = [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是灵犀。"},
                {"role": "user", "content": "再说一遍"}, {"role": "assistant", "content": "我是灵犀。"}]
    sample = render(tok, messages)
    assert mark_supervised(tok, sample) == (
        "<|im_start|>user\n你是谁？<|im_end|>\n<|im_start|>assistant\n«我是灵犀。<|im_end|>»\n"
        "<|im_start|>user\n再说一遍<|im_end|>\n<|im_start|>assistant\n«我是灵犀。<|im_end|>»\n")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert sample.input_ids[-2] == end and tok.decode(sample.input_ids[-1:]) == "\n"
    assert sample.labels[-1] == IGNORE_INDEX and sample.labels[-2] == end and tok.eos_token_id not in sample.input_ids
    assert stop_token_ids(tok)[:2] == [tok.eos_token_id, end]  # (this test tokenizer also has GLM-4's role tokens)
    # the generation prompt is exactly apply_chat_template's
    prompt = ChatRenderer(tok).prompt_ids(messages[:1])
    assert prompt == tok.apply_chat_template(messages[:1], add_generation_prompt=True, return_dict=True)["input_ids"]


def test_truncation_closes_with_the_templates_end_token(chatml_tokenizer):
    messages = [{"role": "user", "content": "写"}, {"role": "assistant", "content": "很长的回答。" * 50}]
    sample = render(chatml_tokenizer, messages, max_length=24, overflow="truncate")
    end = chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert len(sample.input_ids) <= 24 and sample.input_ids[-1] == end and sample.labels[-1] == end


def test_the_doctors_label_checks_hold_for_a_template_that_ends_turns(chatml_tokenizer):
    from sftlab.eval.doctor import check_pad_eos, check_terminator

    messages = [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是灵犀。"}]
    sample = render(chatml_tokenizer, messages)
    example = {"kind": "plain", "messages": messages, "input_ids": sample.input_ids, "labels": sample.labels}
    assert check_terminator(chatml_tokenizer, [example]).status == "pass"
    assert check_pad_eos(chatml_tokenizer, [example]).status == "pass"
    masked = dict(example, labels=sample.labels[:-2] + [IGNORE_INDEX, IGNORE_INDEX])  # <|im_end|> masked
    assert check_terminator(chatml_tokenizer, [masked]).status == "FAIL"
    # SmolLM2's: eos = pad = <|im_end|>, and its template writes a newline after it, so the supervised eos is not
    # the sample's last token
    import copy

    smol = copy.deepcopy(chatml_tokenizer)
    smol.eos_token = smol.pad_token = "<|im_end|>"
    end = smol.eos_token_id
    assert sample.input_ids[-2:] == [end, smol.encode("\n", add_special_tokens=False)[0]]
    assert sample.labels[-2:] == [end, IGNORE_INDEX]
    assert check_pad_eos(smol, [example]).status == "pass"
    eos_masked = dict(example, labels=sample.labels[:-2] + [IGNORE_INDEX, IGNORE_INDEX])
    assert check_pad_eos(smol, [eos_masked]).status == "FAIL"


@pytest.mark.parametrize("reply, call", [
    ('{"name": "get_time", "arguments": {"zone": "UTC"}}', {"name": "get_time", "arguments": {"zone": "UTC"}}),
    (' ```json\n{"name": "get_time"}\n``` ', {"name": "get_time", "arguments": {}}),
    ('{"name": "get_time", "arguments": "UTC"}', None),
    ('{"arguments": {}}', None),
    ("It is ten o'clock.", None),
    ('[{"name": "get_time"}]', None),
])
def test_a_call_in_the_fallback_form_is_read_back_from_a_reply(reply, call):
    from sftlab.chat_tools import fallback_call

    assert fallback_call(reply) == call


def test_a_tool_result_must_follow_a_function_call_in_chat_and_serve_as_in_training():
    conversation = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "let me see"},
                    {"role": "tool", "content": "{\"temp\": 20}"}, {"role": "assistant", "content": "20"}]
    with pytest.raises(MessageError, match="messages\\[2\\]: a tool result follows a plain reply"):
        validate_messages(conversation, for_training=False)
    conversation[1]["tool_calls"] = [function_call("get_weather", {"city": "Paris"})]
    validate_messages(conversation, for_training=False)
    conversation[1]["tool_calls"] = [function_call("get_weather", '{"city": "Paris"}')]  # arguments as text
    with pytest.raises(MessageError, match="messages\\[1\\].tool_calls\\[0\\].function.arguments: expected an object"):
        validate_messages(conversation, for_training=False)
