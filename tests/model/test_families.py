"""Each embedded model family: its published chat template byte for byte, golden masks («» marks the supervised
tokens) for a single turn, a system prompt, several turns and a tool call, its stop ids, and the doctor's
checks on samples rendered for it."""

import json
from importlib import resources

import pytest

from sftlab.chat_format import IGNORE_INDEX, ChatRenderer, TemplateRefused, mark_supervised
from sftlab.chat_tools import function_call, to_template_form
from sftlab.eval.doctor import check_pad_eos, check_template, check_terminator
from sftlab.model.load import load_tokenizer, resolve_model_path
from sftlab.model.tiny import FAMILIES

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CONVERSATIONS = {
    "single_turn": [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是灵犀。"}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello!"}],
    "multi_turn": [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": "3"},
                   {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    "tool_call": [{"role": "user", "content": "Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [function_call("get_weather", {"city": "Paris"})]},
                  {"role": "tool", "content": '{"temp": 21}'},
                  {"role": "assistant", "content": "21 degrees."}],
}
TOOLS_OF = {"tool_call": TOOLS}  # the conversations' tools, beside their messages (OpenAI's form)

GOLDEN = {
    'sftlab:tiny-glm4': {
        'single_turn': (
            '[gMASK]<sop><|user|>\n'
            '你是谁？<|assistant|>«\n'
            '我是灵犀。<|endoftext|>»'
        ),
        'system': (
            '[gMASK]<sop><|system|>\n'
            'Be brief.<|user|>\n'
            'Hi<|assistant|>«\n'
            'Hello!<|endoftext|>»'
        ),
        'multi_turn': (
            '[gMASK]<sop><|user|>\n'
            '1+2?<|assistant|>«\n'
            '3<|user|>»\n'
            '2+2?<|assistant|>«\n'
            '4<|endoftext|>»'
        ),
        'tool_call': (
            '[gMASK]<sop><|system|>\n'
            '你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。\n'
            '\n'
            '# 可用工具\n'
            '## get_weather\n'
            '\n'
            '{\n'
            '    "name": "get_weather",\n'
            '    "description": "Weather now",\n'
            '    "parameters": {\n'
            '        "type": "object",\n'
            '        "properties": {\n'
            '            "city": {\n'
            '                "type": "string"\n'
            '            }\n'
            '        }\n'
            '    }\n'
            '}\n'
            '在调用上述函数时，请使用 Json 格式表示调用的参数。<|user|>\n'
            'Paris?<|assistant|>«get_weather\n'
            '{"city": "Paris"}<|observation|>»\n'
            '{"temp": 21}<|assistant|>«\n'
            '21 degrees.<|endoftext|>»'
        ),
    },
    # GLM-4-0414 renders plain turns exactly as GLM-4; only tools differ (passed to the template)
    'sftlab:tiny-glm4-0414': {
        'tool_call': (
            '[gMASK]<sop><|system|>\n'
            '# 可用工具\n'
            '\n'
            '## get_weather\n'
            '\n'
            '{\n'
            '    "name": "get_weather",\n'
            '    "description": "Weather now",\n'
            '    "parameters": {\n'
            '        "type": "object",\n'
            '        "properties": {\n'
            '            "city": {\n'
            '                "type": "string"\n'
            '            }\n'
            '        }\n'
            '    }\n'
            '}\n'
            '在调用上述函数时，请使用 Json 格式表示调用的参数。<|user|>\n'
            'Paris?<|assistant|>«get_weather \n'
            '{"city": "Paris"}<|observation|>»\n'
            '{"temp": 21}<|assistant|>«\n'
            '21 degrees.<|endoftext|>»'
        ),
    },
    'sftlab:tiny-qwen3': {
        'single_turn': (
            '<|im_start|>user\n'
            '你是谁？<|im_end|>\n'
            '<|im_start|>assistant\n'
            '«<think>\n'
            '\n'
            '</think>\n'
            '\n'
            '我是灵犀。<|im_end|>»\n'
        ),
        'system': (
            '<|im_start|>system\n'
            'Be brief.<|im_end|>\n'
            '<|im_start|>user\n'
            'Hi<|im_end|>\n'
            '<|im_start|>assistant\n'
            '«<think>\n'
            '\n'
            '</think>\n'
            '\n'
            'Hello!<|im_end|>»\n'
        ),
        'multi_turn': (
            '<|im_start|>user\n'
            '1+2?<|im_end|>\n'
            '<|im_start|>assistant\n'
            '«<think>\n'
            '\n'
            '</think>\n'
            '\n'
            '3<|im_end|>»\n'
            '<|im_start|>user\n'
            '2+2?<|im_end|>\n'
            '<|im_start|>assistant\n'
            '«<think>\n'
            '\n'
            '</think>\n'
            '\n'
            '4<|im_end|>»\n'
        ),
        'tool_call': (
            '<|im_start|>system\n'
            '# Tools\n'
            '\n'
            'You may call one or more functions to assist with the user query.\n'
            '\n'
            'You are provided with function signatures within <tools></tools> XML tags:\n'
            '<tools>\n'
            '{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}\n'
            '</tools>\n'
            '\n'
            'For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n'
            '<tool_call>\n'
            '{"name": <function-name>, "arguments": <args-json-object>}\n'
            '</tool_call><|im_end|>\n'
            '<|im_start|>user\n'
            'Paris?<|im_end|>\n'
            '<|im_start|>assistant\n'
            '«<think>\n'
            '\n'
            '</think>\n'
            '\n'
            '<tool_call>\n'
            '{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call><|im_end|>»\n'
            '<|im_start|>user\n'
            '<tool_response>\n'
            '{"temp": 21}\n'
            '</tool_response><|im_end|>\n'
            '<|im_start|>assistant\n'
            '«<think>\n'
            '\n'
            '</think>\n'
            '\n'
            '21 degrees.<|im_end|>»\n'
        ),
    },
    'sftlab:tiny-llama3': {
        'single_turn': (
            '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n'
            '\n'
            'Cutting Knowledge Date: December 2023\n'
            'Today Date: 26 Jul 2024\n'
            '\n'
            '<|eot_id|><|start_header_id|>user<|end_header_id|>\n'
            '\n'
            '你是谁？<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n'
            '\n'
            '«我是灵犀。<|eot_id|>»'
        ),
        'system': (
            '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n'
            '\n'
            'Cutting Knowledge Date: December 2023\n'
            'Today Date: 26 Jul 2024\n'
            '\n'
            'Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n'
            '\n'
            'Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n'
            '\n'
            '«Hello!<|eot_id|>»'
        ),
        'multi_turn': (
            '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n'
            '\n'
            'Cutting Knowledge Date: December 2023\n'
            'Today Date: 26 Jul 2024\n'
            '\n'
            '<|eot_id|><|start_header_id|>user<|end_header_id|>\n'
            '\n'
            '1+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n'
            '\n'
            '«3<|eot_id|>»<|start_header_id|>user<|end_header_id|>\n'
            '\n'
            '2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n'
            '\n'
            '«4<|eot_id|>»'
        ),
        'tool_call': (
            '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n'
            '\n'
            'Environment: ipython\n'
            'Cutting Knowledge Date: December 2023\n'
            'Today Date: 26 Jul 2024\n'
            '\n'
            '<|eot_id|><|start_header_id|>user<|end_header_id|>\n'
            '\n'
            'Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n'
            '\n'
            'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.Do not use variables.\n'
            '\n'
            '{\n'
            '    "type": "function",\n'
            '    "function": {\n'
            '        "name": "get_weather",\n'
            '        "description": "Weather now",\n'
            '        "parameters": {\n'
            '            "type": "object",\n'
            '            "properties": {\n'
            '                "city": {\n'
            '                    "type": "string"\n'
            '                }\n'
            '            }\n'
            '        }\n'
            '    }\n'
            '}\n'
            '\n'
            'Paris?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n'
            '\n'
            '«{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>»<|start_header_id|>ipython<|end_header_id|>\n'
            '\n'
            '"{\\"temp\\": 21}"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n'
            '\n'
            '«21 degrees.<|eot_id|>»'
        ),
    },
}

GOLDEN["sftlab:tiny-glm4-0414"] = {**GOLDEN["sftlab:tiny-glm4"], **GOLDEN["sftlab:tiny-glm4-0414"]}

# parallel calls: one assistant turn (GLM-4 writes each call after its own <|assistant|>, within the one turn)
TOOLS_2 = TOOLS + [{"type": "function", "function": {"name": "get_time", "description": "Time now",
                                                     "parameters": {"type": "object",
                                                                    "properties": {"city": {"type": "string"}}}}}]
PARALLEL_CALLS = [{"role": "user", "content": "Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [function_call("get_weather", {"city": "Paris"}),
                                                                      function_call("get_time", {"city": "Paris"})]},
                  {"role": "tool", "content": '{"temp": 21}'}, {"role": "tool", "content": '{"time": "9:00"}'},
                  {"role": "assistant", "content": "21 degrees at 9:00."}]
GOLDEN["sftlab:tiny-glm4"]["parallel_calls"] = (
    '[gMASK]<sop><|system|>\n'
    '你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。\n'
    '\n'
    '# 可用工具\n'
    '## get_weather\n'
    '\n'
    '{\n'
    '    "name": "get_weather",\n'
    '    "description": "Weather now",\n'
    '    "parameters": {\n'
    '        "type": "object",\n'
    '        "properties": {\n'
    '            "city": {\n'
    '                "type": "string"\n'
    '            }\n'
    '        }\n'
    '    }\n'
    '}\n'
    '在调用上述函数时，请使用 Json 格式表示调用的参数。\n'
    '## get_time\n'
    '\n'
    '{\n'
    '    "name": "get_time",\n'
    '    "description": "Time now",\n'
    '    "parameters": {\n'
    '        "type": "object",\n'
    '        "properties": {\n'
    '            "city": {\n'
    '                "type": "string"\n'
    '            }\n'
    '        }\n'
    '    }\n'
    '}\n'
    '在调用上述函数时，请使用 Json 格式表示调用的参数。<|user|>\n'
    'Paris?<|assistant|>«get_weather\n'
    '{"city": "Paris"}<|assistant|>get_time\n'
    '{"city": "Paris"}<|observation|>»\n'
    '{"temp": 21}<|observation|>\n'
    '{"time": "9:00"}<|assistant|>«\n'
    '21 degrees at 9:00.<|endoftext|>»'
)
GOLDEN["sftlab:tiny-glm4-0414"]["parallel_calls"] = (
    '[gMASK]<sop><|system|>\n'
    '# 可用工具\n'
    '\n'
    '## get_weather\n'
    '\n'
    '{\n'
    '    "name": "get_weather",\n'
    '    "description": "Weather now",\n'
    '    "parameters": {\n'
    '        "type": "object",\n'
    '        "properties": {\n'
    '            "city": {\n'
    '                "type": "string"\n'
    '            }\n'
    '        }\n'
    '    }\n'
    '}\n'
    '在调用上述函数时，请使用 Json 格式表示调用的参数。\n'
    '## get_time\n'
    '\n'
    '{\n'
    '    "name": "get_time",\n'
    '    "description": "Time now",\n'
    '    "parameters": {\n'
    '        "type": "object",\n'
    '        "properties": {\n'
    '            "city": {\n'
    '                "type": "string"\n'
    '            }\n'
    '        }\n'
    '    }\n'
    '}\n'
    '在调用上述函数时，请使用 Json 格式表示调用的参数。<|user|>\n'
    'Paris?<|assistant|>«get_weather \n'
    '{"city": "Paris"}<|assistant|>get_time \n'
    '{"city": "Paris"}<|observation|>»\n'
    '{"temp": 21}<|observation|>\n'
    '{"time": "9:00"}<|assistant|>«\n'
    '21 degrees at 9:00.<|endoftext|>»'
)
GOLDEN["sftlab:tiny-qwen3"]["parallel_calls"] = (
    '<|im_start|>system\n'
    '# Tools\n'
    '\n'
    'You may call one or more functions to assist with the user query.\n'
    '\n'
    'You are provided with function signatures within <tools></tools> XML tags:\n'
    '<tools>\n'
    '{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}\n'
    '{"type": "function", "function": {"name": "get_time", "description": "Time now", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}\n'
    '</tools>\n'
    '\n'
    'For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n'
    '<tool_call>\n'
    '{"name": <function-name>, "arguments": <args-json-object>}\n'
    '</tool_call><|im_end|>\n'
    '<|im_start|>user\n'
    'Paris?<|im_end|>\n'
    '<|im_start|>assistant\n'
    '«<think>\n'
    '\n'
    '</think>\n'
    '\n'
    '<tool_call>\n'
    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    '</tool_call>\n'
    '<tool_call>\n'
    '{"name": "get_time", "arguments": {"city": "Paris"}}\n'
    '</tool_call><|im_end|>»\n'
    '<|im_start|>user\n'
    '<tool_response>\n'
    '{"temp": 21}\n'
    '</tool_response>\n'
    '<tool_response>\n'
    '{"time": "9:00"}\n'
    '</tool_response><|im_end|>\n'
    '<|im_start|>assistant\n'
    '«<think>\n'
    '\n'
    '</think>\n'
    '\n'
    '21 degrees at 9:00.<|im_end|>»\n'
    ''
)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, sftlab_home):
    folder = resolve_model_path(request.param)
    return request.param, folder, load_tokenizer(folder)


@pytest.mark.parametrize("kind", list(CONVERSATIONS))
def test_golden_masks(family, kind):
    name, _, tokenizer = family
    sample = ChatRenderer(tokenizer).render(CONVERSATIONS[kind], TOOLS_OF.get(kind))
    assert mark_supervised(tokenizer, sample) == GOLDEN[name][kind]
    assert len(sample.input_ids) == len(sample.labels)


def test_parallel_calls_are_one_turn_supervised_whole(family):
    """Two calls before any result: one assistant turn, both calls supervised, both results in the prompt;
    Llama-3.1's template refuses parallel calls, which is a clear MessageError (cleaning: tools_unsupported)."""
    name, _, tokenizer = family
    renderer = ChatRenderer(tokenizer)
    if name == "sftlab:tiny-llama3":
        with pytest.raises(TemplateRefused, match="This model only supports single tool-calls at once"):
            renderer.render(PARALLEL_CALLS, TOOLS_2)
        return
    assert mark_supervised(tokenizer, renderer.render(PARALLEL_CALLS, TOOLS_2)) == GOLDEN[name]["parallel_calls"]


# The published templates, as TRL keeps them (it compares them byte for byte with the Hub's in a weekly job)
TRL_COPIES = {"qwen3.jinja": "qwen3.jinja", "llama3.jinja": "llama3_1.jinja"}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_tiny_model_carries_its_familys_template_byte_for_byte(name, sftlab_home):
    file_name = FAMILIES[name].template
    shipped = resources.files("sftlab.model").joinpath("templates", file_name).read_text(encoding="utf-8")
    saved = json.loads((resolve_model_path(name) / "tokenizer_config.json").read_text())["chat_template"]
    assert saved == shipped
    if file_name in TRL_COPIES:
        published = resources.files("trl").joinpath("chat_templates", TRL_COPIES[file_name]).read_text("utf-8")
        assert shipped == published


def test_prompts_equal_apply_chat_template(family):
    """What sftlab prompts with is what transformers (and so vLLM) prompts with, tools included."""
    _, _, tokenizer = family
    renderer = ChatRenderer(tokenizer)
    for kind, messages in CONVERSATIONS.items():
        conversation, tools = to_template_form(messages[:-1], TOOLS_OF.get(kind), *renderer.tool_dialect)
        served = tokenizer.apply_chat_template(conversation, tools=tools or None, add_generation_prompt=True,
                                               return_dict=True)["input_ids"]
        assert renderer.prompt_ids(messages[:-1], TOOLS_OF.get(kind)) == list(served)


def test_qwen3_turns_are_rendered_as_trls_prefix_preserving_training_template_renders_them(sftlab_home):
    """Qwen3's template drops the empty think block from earlier turns; every turn is supervised in the form the
    model generates it, which is what TRL's patched training template renders."""
    from trl.chat_template_utils import get_training_chat_template

    tokenizer = load_tokenizer(resolve_model_path("sftlab:tiny-qwen3"))
    training_template = get_training_chat_template(tokenizer)
    renderer = ChatRenderer(tokenizer)
    for kind in ("multi_turn", "tool_call"):
        conversation, tools = to_template_form(CONVERSATIONS[kind], TOOLS_OF.get(kind), *renderer.tool_dialect)
        expected = tokenizer.apply_chat_template(conversation, tools=tools or None, chat_template=training_template,
                                                 tokenize=False)
        assert tokenizer.decode(renderer.render(CONVERSATIONS[kind], TOOLS_OF.get(kind)).input_ids) == expected


STOPS = {"sftlab:tiny-glm4": ["<|endoftext|>", "<|user|>", "<|observation|>"],
         "sftlab:tiny-glm4-0414": ["<|endoftext|>", "<|user|>", "<|observation|>"],
         "sftlab:tiny-qwen3": ["<|im_end|>", "<|endoftext|>"],
         "sftlab:tiny-llama3": ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"]}


def test_stop_ids_come_from_the_template_and_the_generation_config(family):
    name, folder, tokenizer = family
    generation_eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    stops = ChatRenderer(tokenizer, generation_eos=generation_eos).stop_ids
    assert sorted(tokenizer.convert_ids_to_tokens(stops)) == sorted(STOPS[name])
    assert set(ChatRenderer(tokenizer).stop_ids) <= set(stops)  # the template alone already stops the turn


def test_doctor_label_and_template_checks_hold_for_every_family(family):
    name, folder, tokenizer = family
    renderer, examples = ChatRenderer(tokenizer), []
    for kind, messages in CONVERSATIONS.items():
        sample = renderer.render(messages, TOOLS_OF.get(kind))
        examples.append({"kind": kind, "messages": messages, **({"tools": TOOLS} if kind in TOOLS_OF else {}),
                         "input_ids": sample.input_ids, "labels": sample.labels})
    assert check_terminator(tokenizer, examples).status == "pass"
    assert check_pad_eos(tokenizer, examples).status == "pass"
    assert check_template(folder, tokenizer, examples).status == "pass", check_template(folder, tokenizer, examples)
    last = max(i for i, label in enumerate(examples[0]["labels"]) if label != IGNORE_INDEX)
    masked = dict(examples[0], labels=examples[0]["labels"][:last] + [IGNORE_INDEX] * (len(examples[0]["labels"]) - last))
    assert check_terminator(tokenizer, [masked]).status == "FAIL"


def test_replies_leave_out_the_templates_opening(family):
    name, _, tokenizer = family
    opening = ChatRenderer(tokenizer).reply_opening
    assert opening == {"sftlab:tiny-qwen3": "<think>\n\n</think>\n\n", "sftlab:tiny-llama3": ""}.get(name, "\n")
