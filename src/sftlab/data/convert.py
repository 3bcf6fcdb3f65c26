"""Row formats, in one registry (FORMATS): a source row (alpaca, ShareGPT, OpenAI messages, prompt/completion) ->
a conversation in OpenAI's form, (messages, tools): `tools` beside the messages, a call in an assistant message's
`tool_calls` with its arguments as an object (parallel calls in one message), a result as a `tool` message.
GLM-4's own form (a call as an assistant message naming its function in `metadata`, a result as `observation`)
is read too. Each transform raises FieldError naming the bad field; the loader adds the file and line.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass

from sftlab.chat_tools import Message, content_text, function_call

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "observation": "tool", "tool": "tool", "function_call": "assistant"}
Conversation = tuple[list[Message], list[dict] | None]  # (messages, tools)


class FieldError(ValueError):
    """A row whose field is missing or of the wrong type."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field!r}: {problem}")
        self.field, self.problem = field, problem

    def __reduce__(self):  # pickled with its own arguments (the default would call it with the message alone)
        return type(self), (self.field, self.problem)


class ToolCallError(FieldError):
    """A function call that a model could not be trained to write: not JSON, no name, arguments not JSON."""


def _text(row: dict, field: str, required: bool = True) -> str:
    value = row.get(field)
    if value is None:
        if required:
            raise FieldError(field, "missing")
        return ""
    if not isinstance(value, str):
        raise FieldError(field, f"expected a string, got {type(value).__name__}")
    return value


def alpaca_prompt(instruction: str, input_: str) -> str:
    """The tutorial's prompt: the instruction, plus a blank line and the input when there is one."""
    return instruction + "\n\n" + input_ if input_ else instruction


def alpaca_to_messages(row: dict, system_prompt: str | None = None) -> list[dict]:
    """Alpaca (instruction, input, output, optional system and history) -> messages."""
    instruction, input_, output = _text(row, "instruction"), _text(row, "input", False), _text(row, "output")
    system = _text(row, "system", False) or system_prompt
    messages = [{"role": "system", "content": system}] if system is not None else []
    history = row.get("history") or []
    if not isinstance(history, list):
        raise FieldError("history", "expected a list of [prompt, response] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise FieldError(f"history[{i}]", "expected a [prompt, response] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages.append({"role": "user", "content": alpaca_prompt(instruction, input_)})
    messages.append({"role": "assistant", "content": output})
    return messages


def parse_tools(value, field: str = "tools") -> list[dict]:
    """Tools as a JSON string or a list; bare function schemas are wrapped as OpenAI's {"type": "function",
    "function": ...}."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as exc:
            raise FieldError(field, f"not valid JSON ({exc.msg})") from exc
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise FieldError(field, "expected a list of tool objects")
    return [t if "type" in t else {"type": "function", "function": t} for t in value]


def _tool_call(value, field: str) -> dict:
    """A call ({"name", "arguments"}, or its JSON as a glaive function_call turn writes it) -> an entry of
    tool_calls, its arguments an object (OpenAI and glaive write them as a JSON string)."""
    try:
        call = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as exc:
        raise ToolCallError(field, f"function_call is not valid JSON ({exc.msg})") from exc
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"].strip():
        raise ToolCallError(field, "function_call needs a name")
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI and glaive write the arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise ToolCallError(field, f"the arguments of {call['name']} are not valid JSON ({exc.msg})") from exc
    if not isinstance(arguments, dict):
        raise ToolCallError(field, f"the arguments of {call['name']} are not a JSON object")
    return function_call(call["name"], arguments)


def with_tools(messages: list[dict], tools, system_prompt: str | None) -> Conversation:
    """The conversation with its tools (a row's `tools` field: a list or JSON text); `system_prompt` (when not
    None) as the system message of a row that has none: "" gives it an empty one, which keeps a chat template's
    default system prompt out."""
    if (not messages or messages[0]["role"] != "system") and system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages, (parse_tools(tools) or None) if tools else None


def add_call(messages: list[dict], call: dict) -> None:
    """A call after a call is a parallel one: the same assistant message (one turn)."""
    if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
        messages[-1]["tool_calls"].append(call)
    else:
        messages.append({"role": "assistant", "content": "", "tool_calls": [call]})


def sharegpt_to_messages(row: dict, system_prompt: str | None = None) -> Conversation:
    """ShareGPT (`conversations` of from/value, glaive function_call/observation turns, optional tools/system)."""
    turns = row.get("conversations")
    if not isinstance(turns, list):
        raise FieldError("conversations", "expected a list of {from, value} turns")
    messages = [{"role": "system", "content": _text(row, "system")}] if row.get("system") else []
    for i, turn in enumerate(turns):
        field = f"conversations[{i}]"
        if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
            raise FieldError(f"{field}.from", f"expected one of {', '.join(SHAREGPT_ROLES)}")
        if not isinstance(turn.get("value"), str):
            raise FieldError(f"{field}.value", "expected a string")
        if turn["from"] == "function_call":
            add_call(messages, _tool_call(turn["value"], f"{field}.value"))
        else:
            messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return with_tools(messages, row.get("tools"), system_prompt)


def openai_to_messages(row: dict, system_prompt: str | None = None) -> Conversation:
    """OpenAI chat (`messages` of role/content, `tool` results, assistant `tool_calls`, optional tools); GLM-4's
    form of the same (`metadata` calls, `observation` results, tools on the system message) is read too."""
    raw = row.get("messages")
    if not isinstance(raw, list):
        raise FieldError("messages", "expected a list of {role, content} messages")
    messages, glm_tools = [], None
    for i, message in enumerate(raw):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            raise FieldError(field, "expected an object")
        glm_tools = glm_tools or message.get("tools")
        calls = _calls(message, field)
        content = "" if message.get("content") is None and calls else content_text(message.get("content"))
        if content is None:
            raise FieldError(f"{field}.content", "expected a string or a list of text parts")
        if message.get("metadata"):  # GLM-4's call: its content was the arguments
            content = ""
        if calls and not content.strip():
            for call in calls:
                add_call(messages, call)
        elif calls:
            messages.append({"role": "assistant", "content": content, "tool_calls": calls})
        elif message.get("role") == "system" and not content.strip() and message.get("tools"):
            continue  # GLM-4's tools-only system message: the tools go beside the messages
        else:
            messages.append({"role": {"observation": "tool"}.get(message.get("role"), message.get("role")),
                             "content": content})
    return with_tools(messages, row.get("tools") or glm_tools, system_prompt)


def _calls(message: dict, field: str) -> list[dict]:
    """A message's calls as tool_calls entries: OpenAI's `tool_calls`, or GLM-4's `metadata` call."""
    if message.get("metadata") and message.get("role") == "assistant":
        return [_tool_call({"name": message["metadata"], "arguments": message.get("content") or ""}, field)]
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise FieldError(f"{field}.tool_calls", "expected a list of calls")
    functions = [call.get("function", call) if isinstance(call, dict) else None for call in calls]
    if not all(isinstance(function, dict) for function in functions):
        raise FieldError(f"{field}.tool_calls", "expected objects with a function")
    return [_tool_call(function, f"{field}.tool_calls") for function in functions]


def prompt_completion_to_messages(row: dict, system_prompt: str | None = None) -> Conversation:
    messages = [{"role": "user", "content": _text(row, "prompt")},
                {"role": "assistant", "content": _text(row, "completion")}]
    return with_tools(messages, row.get("tools"), system_prompt)


@dataclass(frozen=True)
class RowFormat:
    """A row format: the keys that identify a row of it, every field it reads (what a dataset's `columns` may map
    onto) and its transform to messages. A new format is a transform and one entry in FORMATS."""

    name: str
    keys: tuple[str, ...]  # all present: a row of this format (the first match in FORMATS wins)
    fields: tuple[str, ...]
    to_messages: Callable[[dict, str | None], Conversation]
    shown_as: str  # how the rejection of a row of no format names it


FORMATS = {f.name: f for f in (
    RowFormat("openai", ("messages",), ("messages", "tools"), openai_to_messages, "openai messages"),
    RowFormat("sharegpt", ("conversations",), ("conversations", "system", "tools"), sharegpt_to_messages,
              "sharegpt conversations"),
    RowFormat("alpaca", ("instruction", "output"), ("instruction", "input", "output", "system", "history"),
              lambda row, system_prompt: (alpaca_to_messages(row, system_prompt), None), "alpaca instruction/output"),
    RowFormat("prompt_completion", ("prompt", "completion"), ("prompt", "completion", "tools"),
              prompt_completion_to_messages, "prompt/completion"),
)}
FIELDS = tuple(dict.fromkeys(name for f in FORMATS.values() for name in f.fields))
NO_FORMAT = f"no known fields ({', '.join(f.shown_as for f in FORMATS.values())})"


def detect_format(row) -> str | None:
    """The format a row's keys say, or None."""
    if not isinstance(row, dict):
        return None
    return next((f.name for f in FORMATS.values() if all(key in row for key in f.keys)), None)


def check_format_name(name: str) -> None:
    """data_format: auto, or the name of a format in FORMATS."""
    if name != "auto" and name not in FORMATS:
        raise ValueError(f"data_format: {name!r} is not one of auto, {', '.join(FORMATS)}")


def to_messages(row, fmt: str, system_prompt: str | None = None) -> Conversation:
    if not isinstance(row, dict):
        raise FieldError("<row>", f"expected a JSON object, got {type(row).__name__}")
    return FORMATS[fmt].to_messages(row, system_prompt)
