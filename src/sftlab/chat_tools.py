"""Tool calls in the forms chat templates take. sftlab's messages carry tools on a message (`tools`), a call as an
assistant message naming its function (`metadata`, the arguments as JSON text) and a result as role `observation`
(GLM-4's own form). Templates that take OpenAI's form get `tools=` and `tool_calls` / role `tool` instead
(to_template_form), and templates that render no tools get sftlab's fallback: plain text, one message for one
(to_fallback_form), read back by fallback_call.
"""

import json

from sftlab.errors import MessageError

PROBE_TOOL = {"type": "function", "function": {
    "name": "sftlab_probe_fn", "description": "sftlab_probe_description",
    "parameters": {"type": "object", "properties": {"sftlab_probe_arg": {"type": "string"}}}}}
PROBE_TOOL_CONVERSATION = [
    {"role": "system", "content": "", "tools": [PROBE_TOOL]},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "metadata": "sftlab_probe_fn", "content": '{"sftlab_probe_arg": "sftlab_probe_value"}'},
    {"role": "observation", "content": "sftlab_probe_result"},
]
# (tools passed to the template, calls and results in OpenAI's form): sftlab's own form first
TOOL_DIALECTS = ((False, False), (True, False), (True, True))


def has_tool_parts(messages: list[dict]) -> bool:
    return any(m.get("tools") or m.get("metadata") or m["role"] == "observation" for m in messages)


def to_template_form(messages: list[dict], tools_as_kwarg: bool, openai_calls: bool) -> tuple[list[dict], list]:
    """sftlab's messages -> (messages, tools) in the form a template wants (see TOOL_DIALECTS)."""
    if not (tools_as_kwarg or openai_calls) or not has_tool_parts(messages):
        return messages, []
    out, tools = [], []
    for i, message in enumerate(messages):
        if message.get("tools"):
            tools = message["tools"]
            message = {k: v for k, v in message.items() if k != "tools"}
            if message["role"] == "system" and not message["content"].strip():
                continue  # a tools-only system message: the template writes the tools itself
        if openai_calls and message["role"] == "assistant" and message.get("metadata"):
            try:
                arguments = json.loads(message["content"]) if message["content"].strip() else {}
            except json.JSONDecodeError as exc:
                raise MessageError(f"messages[{i}].content: the arguments of {message['metadata']} are not valid "
                                   f"JSON ({exc.msg})") from exc
            call = {"type": "function", "function": {"name": message["metadata"], "arguments": arguments}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):  # parallel calls: one turn
                out[-1]["tool_calls"].append(call)
                continue
            message = {"role": "assistant", "content": "", "tool_calls": [call]}
        elif openai_calls and message["role"] == "observation":
            message = {"role": "tool", "content": message["content"]}
        out.append(message)
    return out, (tools if tools_as_kwarg else [])


FALLBACK_TOOLS_INTRO = "You can call these functions (JSON schemas, one per line):"
FALLBACK_TOOLS_HOWTO = ('To call one, reply with only a JSON object: {"name": "<function name>", "arguments": '
                        '{<arguments>}}. Its result comes back in the next message, starting with "Result of".')
FALLBACK_RESULT = "Result of {name}: {content}"


def fallback_tools_text(tools: list[dict]) -> str:
    listing = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    return f"{FALLBACK_TOOLS_INTRO}\n{listing}\n{FALLBACK_TOOLS_HOWTO}"


def to_fallback_form(messages: list[dict]) -> list[dict]:
    """sftlab's tool messages -> plain system, user and assistant text: tools appended to the system message's
    text, a call as the JSON object {"name": ..., "arguments": {...}} (parallel calls: one per line, in one
    reply), a result as a user message "Result of NAME: CONTENT" (the results of parallel calls name their calls
    in order)."""
    out, pending, called = [], [], "the function"
    for i, message in enumerate(messages):
        if message.get("tools"):
            text, tools = message["content"].strip(), fallback_tools_text(message["tools"])
            message = {"role": message["role"], "content": f"{text}\n\n{tools}" if text else tools}
        elif message["role"] == "assistant" and message.get("metadata"):
            called = message["metadata"]
            try:
                arguments = json.loads(message["content"]) if message["content"].strip() else {}
            except json.JSONDecodeError as exc:
                raise MessageError(f"messages[{i}].content: the arguments of {called} are not valid JSON "
                                   f"({exc.msg})") from exc
            call = json.dumps({"name": called, "arguments": arguments}, ensure_ascii=False)
            if messages[i - 1]["role"] == "assistant" and messages[i - 1].get("metadata"):  # a parallel call
                out[-1] = {"role": "assistant", "content": f"{out[-1]['content']}\n{call}"}
                pending.append(called)
                continue
            message, pending = {"role": "assistant", "content": call}, [called]
        elif message["role"] == "observation":
            name = pending.pop(0) if pending else called
            message = {"role": "user", "content": FALLBACK_RESULT.format(name=name, content=message["content"])}
        out.append(message)
    return out


def fallback_call(reply: str) -> dict | None:
    """A function call in the fallback form read back from a reply: {"name": str, "arguments": dict}, or None
    when the reply is not one (a code fence around the JSON is allowed). Of parallel calls, one per line, the
    first."""
    text = reply.strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("json").strip()
    text = text.split("\n{", 1)[0]  # parallel calls: the first line's
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not (isinstance(value, dict) and isinstance(value.get("name"), str) and value["name"]
            and isinstance(value.get("arguments", {}), dict)):
        return None
    return {"name": value["name"], "arguments": value.get("arguments", {})}
