"""Row formats, in one registry (FORMATS): a source row (alpaca, ShareGPT, OpenAI messages, prompt/completion) ->
chat messages.

Tools travel in a system message (`{"role": "system", "content": "", "tools": [...]}`), where GLM-4's chat
template renders them. A tool call is an assistant message whose `metadata` is the function name and whose
content is the JSON arguments, as GLM-4 writes it. Each transform raises FieldError naming the bad field;
the loader adds the file and line.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass

from sftlab.chat_format import content_text

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "observation": "observation", "tool": "observation",
                  "function_call": "assistant"}


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
    """Tools as a JSON string or a list; bare function schemas are wrapped as GLM-4 expects them."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as exc:
            raise FieldError(field, f"not valid JSON ({exc.msg})") from exc
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise FieldError(field, "expected a list of tool objects")
    return [t if "type" in t else {"type": "function", "function": t} for t in value]


def _tool_call(value: str, field: str) -> dict:
    """A glaive-style function_call turn ({"name", "arguments"}) -> GLM-4's assistant tool call."""
    try:
        call = json.loads(value)
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
    content = json.dumps(arguments, ensure_ascii=False)
    return {"role": "assistant", "metadata": call["name"], "content": content}


def with_tools(messages: list[dict], row: dict, system_prompt: str | None) -> list[dict]:
    """The row's tools on its system message; `system_prompt` (when not None) as the system message of a row
    that has none: "" gives it an empty one, which keeps a chat template's default system prompt out."""
    tools = parse_tools(row["tools"]) if row.get("tools") else []
    has_system = bool(messages) and messages[0]["role"] == "system"
    if tools:
        if has_system:
            messages[0]["tools"] = tools
        else:
            messages.insert(0, {"role": "system", "content": system_prompt or "", "tools": tools})
    elif not has_system and system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def sharegpt_to_messages(row: dict, system_prompt: str | None = None) -> list[dict]:
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
            messages.append(_tool_call(turn["value"], f"{field}.value"))
        else:
            messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return with_tools(messages, row, system_prompt)


def openai_to_messages(row: dict, system_prompt: str | None = None) -> list[dict]:
    """OpenAI chat (`messages` of role/content, `tool` results, assistant `tool_calls`, optional tools)."""
    raw = row.get("messages")
    if not isinstance(raw, list):
        raise FieldError("messages", "expected a list of {role, content} messages")
    messages = []
    for i, message in enumerate(raw):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            raise FieldError(field, "expected an object")
        role = {"tool": "observation"}.get(message.get("role"), message.get("role"))
        if message.get("tool_calls"):
            for call in message["tool_calls"]:
                function = call.get("function", call) if isinstance(call, dict) else None
                if not isinstance(function, dict):
                    raise FieldError(f"{field}.tool_calls", "expected objects with a function")
                messages.append(_tool_call(json.dumps(function, ensure_ascii=False), f"{field}.tool_calls"))
            continue
        content = content_text(message.get("content"))
        if content is None:
            raise FieldError(f"{field}.content", "expected a string or a list of text parts")
        messages.append({"role": role, "content": content})
    return with_tools(messages, row, system_prompt)


def prompt_completion_to_messages(row: dict, system_prompt: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": _text(row, "prompt")},
                {"role": "assistant", "content": _text(row, "completion")}]
    return with_tools(messages, row, system_prompt)


@dataclass(frozen=True)
class RowFormat:
    """A row format: the keys that identify a row of it, every field it reads (what a dataset's `columns` may map
    onto) and its transform to messages. A new format is a transform and one entry in FORMATS."""

    name: str
    keys: tuple[str, ...]  # all present: a row of this format (the first match in FORMATS wins)
    fields: tuple[str, ...]
    to_messages: Callable[[dict, str | None], list[dict]]
    shown_as: str  # how the rejection of a row of no format names it


FORMATS = {f.name: f for f in (
    RowFormat("openai", ("messages",), ("messages", "tools"), openai_to_messages, "openai messages"),
    RowFormat("sharegpt", ("conversations",), ("conversations", "system", "tools"), sharegpt_to_messages,
              "sharegpt conversations"),
    RowFormat("alpaca", ("instruction", "output"), ("instruction", "input", "output", "system", "history", "tools"),
              alpaca_to_messages, "alpaca instruction/output"),
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


def to_messages(row, fmt: str, system_prompt: str | None = None) -> list[dict]:
    if not isinstance(row, dict):
        raise FieldError("<row>", f"expected a JSON object, got {type(row).__name__}")
    return FORMATS[fmt].to_messages(row, system_prompt)
