"""Tool calls in the forms templates take (chat_tools.py): OpenAI's form inside, each template's dialect at the
edge, and parallel calls one turn in every form."""

import json

from sftlab.chat_tools import (
    CallFormat,
    fallback_call,
    function_call,
    glm_form,
    to_fallback_form,
    to_template_form,
)

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {}}},
         {"type": "function", "function": {"name": "g", "parameters": {}}}]
PARALLEL = [{"role": "user", "content": "go"},
            {"role": "assistant", "content": "", "tool_calls": [function_call("f", {"x": 1}),
                                                                function_call("g", {"y": "是"})]},
            {"role": "tool", "content": "F done"}, {"role": "tool", "content": "G done"},
            {"role": "assistant", "content": "both done"}]


def test_openai_form_goes_to_an_openai_template_as_it_is():
    assert to_template_form(PARALLEL, TOOLS, tools_as_kwarg=True, openai_calls=True) == (PARALLEL, TOOLS)


def test_glm4_form_puts_the_tools_on_the_system_message_and_each_call_in_a_message_of_its_own():
    messages, tools = to_template_form(PARALLEL, TOOLS, tools_as_kwarg=False, openai_calls=False)
    assert tools == [] and messages == [
        {"role": "system", "content": "", "tools": TOOLS}, {"role": "user", "content": "go"},
        {"role": "assistant", "metadata": "f", "content": '{"x": 1}'},
        {"role": "assistant", "metadata": "g", "content": '{"y": "是"}'},
        {"role": "observation", "content": "F done"}, {"role": "observation", "content": "G done"},
        {"role": "assistant", "content": "both done"}]
    with_system = [{"role": "system", "content": "Be brief."}, *PARALLEL]
    assert glm_form(with_system, TOOLS)[0] == {"role": "system", "content": "Be brief.", "tools": TOOLS}
    # GLM-4-0414: the tools passed to the template, the calls in GLM-4's form
    messages, tools = to_template_form(PARALLEL, TOOLS, tools_as_kwarg=True, openai_calls=False)
    assert tools == TOOLS and messages[0] == {"role": "user", "content": "go"} and messages[1]["metadata"] == "f"


def test_fallback_form_writes_parallel_calls_one_per_line_in_one_reply_and_names_each_result():
    messages = to_fallback_form(PARALLEL, TOOLS)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "user", "assistant"]
    assert messages[0]["content"].startswith("You can call these functions")
    assert messages[2]["content"].splitlines() == [json.dumps({"name": "f", "arguments": {"x": 1}}),
                                                   json.dumps({"name": "g", "arguments": {"y": "是"}},
                                                              ensure_ascii=False)]
    assert [messages[3]["content"], messages[4]["content"]] == ["Result of f: F done", "Result of g: G done"]
    assert fallback_call(messages[2]["content"]) == {"name": "f", "arguments": {"x": 1}}  # the first of them


QWEN = CallFormat.learn('<tool_call>\n{"name": "sftlab_probe_fn", "arguments": {"sftlab_probe_arg": '
                        '"sftlab_probe_value"}}\n</tool_call>')
GLM = CallFormat.learn('sftlab_probe_fn\n{"sftlab_probe_arg": "sftlab_probe_value"}')
FALLBACK = CallFormat.learn('{"name": "sftlab_probe_fn", "arguments": {"sftlab_probe_arg": "sftlab_probe_value"}}')


def test_a_call_format_is_learned_from_one_rendered_call():
    assert QWEN == CallFormat("<tool_call>\n", "\n</tool_call>", "name", "arguments")
    assert GLM == CallFormat("", "", None, "")
    assert FALLBACK == CallFormat("", "", "name", "arguments")
    assert CallFormat.learn("I would call sftlab_probe_fn here") is None


def test_calls_are_read_back_with_the_words_before_them_and_only_for_offered_functions():
    reply = 'Checking.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n' \
            '<tool_call>\n{"name": "g", "arguments": "{\\"y\\": \\"是\\"}"}\n</tool_call>'
    assert QWEN.calls_in(reply, {"f", "g"}) == ("Checking.", [{"name": "f", "arguments": {"x": 1}},
                                                             {"name": "g", "arguments": {"y": "是"}}])
    assert QWEN.calls_in(reply, {"f"}) is None  # g was not offered: the reply stays text
    assert QWEN.calls_in(reply.replace("</tool_call>", "", 1), {"f", "g"}) is None  # malformed: text
    assert GLM.calls_in('f\n{"x": 1}g\n{"y": 2}', {"f", "g"}) == (
        "", [{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {"y": 2}}])
    assert GLM.calls_in("f is a letter", {"f"}) is None
    assert FALLBACK.calls_in('```json\n{"name": "f", "arguments": {}}\n```', {"f"}) == (
        "", [{"name": "f", "arguments": {}}])
    assert FALLBACK.calls_in('Sure: {"name": "f", "arguments": {}}', {"f"}) is None


def test_a_stream_holds_back_only_what_may_still_become_a_call():
    assert QWEN.may_become_call("Checking.\n<tool", {"f"}) == len("Checking.")
    assert QWEN.may_become_call("Checking the <b>", {"f"}) == len("Checking the <b>")
    assert FALLBACK.may_become_call('{"na', {"f"}) == 0 and FALLBACK.may_become_call("Hello", {"f"}) == 5
    assert FALLBACK.may_become_call("```json\n{", {"f"}) == 0
    assert GLM.may_become_call("ge", {"get_time"}) == 0  # may be the name of get_time
    assert GLM.may_become_call('get_time\n{"ci', {"get_time"}) == 0
    assert GLM.may_become_call("get ready", {"get_time"}) == len("get ready")
