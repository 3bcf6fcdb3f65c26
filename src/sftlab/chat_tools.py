"""OpenAI's message form, which sftlab's conversations are in, and the tool-call dialects chat templates take.
The form: `tools` beside the messages (passed to a template as `tools=`), a call as an assistant message's
`tool_calls` with the arguments as an object (parallel calls are one message: one turn), a result as a message of
role `tool`, content as text (content_text).

Each template gets its own dialect at the edge (to_template_form): OpenAI's form as it is (Qwen, Llama-3.1);
GLM-4-0414's, the tools passed but each call an assistant message naming its function (`metadata`) with the
arguments as JSON text, and each result role `observation`; GLM-4's, the same with the tools on the system
message. A template that renders no tools gets sftlab's fallback, plain text (to_fallback_form), read back by
fallback_call.
"""

import json
import re
from dataclasses import dataclass
from typing import Literal, NotRequired, TypedDict

from sftlab.errors import MessageError


class Function(TypedDict):
    name: str
    arguments: dict  # an object, not OpenAI's JSON string: templates render it (`| tojson`)


class ToolCall(TypedDict):
    type: Literal["function"]
    function: Function


class Message(TypedDict):
    """One message of a conversation inside sftlab (validate_messages checks it)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str  # "" for an assistant message that only calls
    tool_calls: NotRequired[list[ToolCall]]  # an assistant's calls; parallel calls in one message


def content_text(content) -> str | None:
    """An OpenAI message's content as text: a string, or a list of text parts ({"type": "text", "text": ...})
    joined; None for anything else (an image part, a number). The data loader and the server read it alike."""
    if isinstance(content, str):
        return content
    is_text = [isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
               for p in content] if isinstance(content, list) else [False]
    if all(is_text):
        return "".join(p["text"] for p in content)
    return None


def function_call(name: str, arguments: dict) -> ToolCall:
    """One entry of an assistant message's tool_calls."""
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


PROBE_TOOLS = [{"type": "function", "function": {
    "name": "sftlab_probe_fn", "description": "sftlab_probe_description",
    "parameters": {"type": "object", "properties": {"sftlab_probe_arg": {"type": "string"}}}}}]
PROBE_TOOL_CONVERSATION = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "",
     "tool_calls": [function_call("sftlab_probe_fn", {"sftlab_probe_arg": "sftlab_probe_value"})]},
    {"role": "tool", "content": "sftlab_probe_result"},
]
# (tools passed to the template, calls and results in OpenAI's form): GLM-4's dialect first
TOOL_DIALECTS = ((False, False), (True, False), (True, True))


def calls_text(message: dict) -> str:
    """A message's function calls as text (name and JSON arguments, one per line); "" for none."""
    return "\n".join(f"{call['function']['name']} {json.dumps(call['function']['arguments'], ensure_ascii=False)}"
                     for call in message.get("tool_calls") or [])


def message_text(message: dict) -> str:
    """What a message says: its content, and the calls it makes."""
    calls = calls_text(message)
    return f"{message['content']}\n{calls}" if message["content"] and calls else message["content"] or calls


def has_tool_parts(messages: list[dict], tools: list | None = None) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)


def to_template_form(messages: list[Message], tools: list | None, tools_as_kwarg: bool, openai_calls: bool
                     ) -> tuple[list[dict], list]:
    """(messages, tools) in the form a template wants (see TOOL_DIALECTS)."""
    tools = tools or []
    if openai_calls or not has_tool_parts(messages, tools):
        return messages, tools if tools_as_kwarg else []
    return glm_form(messages, [] if tools_as_kwarg else tools), tools if tools_as_kwarg else []


def glm_form(messages: list[Message], system_tools: list) -> list[dict]:
    """OpenAI's form -> GLM-4's: each call an assistant message whose `metadata` is the function's name and whose
    content is the arguments as JSON (parallel calls one after another), each result role `observation`, and
    `system_tools` on the system message (one is added where there is none)."""
    out = []
    if system_tools:
        first = messages[0] if messages and messages[0]["role"] == "system" else {"role": "system", "content": ""}
        out.append({**first, "tools": system_tools})
        messages = messages[1:] if first is messages[0] else messages
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            if message["content"].strip():  # words before the calls: a turn of their own in GLM-4's form
                out.append({"role": "assistant", "content": message["content"]})
            out += [{"role": "assistant", "metadata": call["function"]["name"],
                     "content": json.dumps(call["function"]["arguments"], ensure_ascii=False)}
                    for call in message["tool_calls"]]
        elif message["role"] == "tool":
            out.append({"role": "observation", "content": message["content"]})
        else:
            out.append(message)
    return out


FALLBACK_TOOLS_INTRO = "You can call these functions (JSON schemas, one per line):"
FALLBACK_TOOLS_HOWTO = ('To call one, reply with only a JSON object: {"name": "<function name>", "arguments": '
                        '{<arguments>}}. Its result comes back in the next message, starting with "Result of".')
FALLBACK_RESULT = "Result of {name}: {content}"


def fallback_tools_text(tools: list[dict]) -> str:
    listing = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    return f"{FALLBACK_TOOLS_INTRO}\n{listing}\n{FALLBACK_TOOLS_HOWTO}"


def to_fallback_form(messages: list[Message], tools: list | None) -> list[Message]:
    """Plain system, user and assistant text: the tools appended to the system message's text (one is added where
    there is none), a call as the JSON object {"name": ..., "arguments": {...}} (parallel calls one per line, in
    one reply), a result as a user message "Result of NAME: CONTENT" (the results of parallel calls name their
    calls in order)."""
    out, pending, called = [], [], "the function"
    if tools:
        first = messages[0] if messages and messages[0]["role"] == "system" else {"role": "system", "content": ""}
        text, listing = first["content"].strip(), fallback_tools_text(tools)
        out.append({"role": "system", "content": f"{text}\n\n{listing}" if text else listing})
        messages = messages[1:] if first is messages[0] else messages
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            pending = [call["function"]["name"] for call in message["tool_calls"]]
            called = pending[-1]
            lines = [json.dumps({"name": call["function"]["name"], "arguments": call["function"]["arguments"]},
                                ensure_ascii=False) for call in message["tool_calls"]]
            words = [message["content"]] if message["content"].strip() else []
            message = {"role": "assistant", "content": "\n".join(words + lines)}
        elif message["role"] == "tool":
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


def check_tool_calls(calls, i: int) -> None:
    """An assistant message's tool_calls: a list of {"type": "function", "function": {"name", "arguments"}}, each
    name a non-empty string and the arguments an object (a MessageError naming the first that is not)."""
    if not isinstance(calls, list) or not calls:
        raise MessageError(f"messages[{i}].tool_calls: expected a non-empty list")
    for n, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise MessageError(f"messages[{i}].tool_calls[{n}]: expected a function with a name")
        if not isinstance(function.get("arguments"), dict):
            raise MessageError(f"messages[{i}].tool_calls[{n}].function.arguments: expected an object")


PROBE_CALL_NAME, PROBE_CALL_ARGUMENTS = "sftlab_probe_fn", {"sftlab_probe_arg": "sftlab_probe_value"}
_NAME = re.compile(r"[A-Za-z_][\w.\-]*")


@dataclass(frozen=True)
class CallFormat:
    """How a model writes a function call in its reply, learned from its own template's rendering of one call
    (ChatRenderer.call_format), so that a reply can be read back as OpenAI's `tool_calls` for every family
    without a parser per family: either a JSON object holding the name and the arguments (Qwen3's
    `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, Llama-3.1's `{"name": ..., "parameters":
    {...}}`, the fallback form), or the name as text before the JSON arguments (GLM-4's `NAME\\n{...}`).
    Parallel calls are the same shape one after another."""

    prefix: str  # before each call ("" when a call is the whole reply)
    suffix: str  # after each call
    name_key: str | None  # the JSON key of the name; None: the name is text before the arguments
    arguments_key: str  # the JSON key of the arguments ("" for name-first calls)

    @classmethod
    def learn(cls, rendered: str) -> "CallFormat | None":
        """From a reply that is one call of PROBE_CALL_NAME with PROBE_CALL_ARGUMENTS (special tokens removed);
        None if the call cannot be found in it."""
        decoder = json.JSONDecoder()
        name_at = rendered.find(PROBE_CALL_NAME)
        for start in (i for i, c in enumerate(rendered) if c == "{"):
            try:
                value, end = decoder.raw_decode(rendered, start)
            except json.JSONDecodeError:
                continue
            if start > name_at >= 0 and value == PROBE_CALL_ARGUMENTS:  # the name, then the arguments
                return cls(rendered[:name_at], rendered[end:], None, "")
            if isinstance(value, dict) and start < name_at:
                name_key = next((k for k, v in value.items() if v == PROBE_CALL_NAME), None)
                arguments_key = next((k for k, v in value.items() if _as_arguments(v) == PROBE_CALL_ARGUMENTS), None)
                if name_key and arguments_key:
                    return cls(rendered[:start], rendered[end:], name_key, arguments_key)
        return None

    def calls_in(self, reply: str, names: set[str]) -> tuple[str, list[dict]] | None:
        """(the words before the calls, the calls as {"name", "arguments": dict}) when `reply` ends in one or
        more calls of this shape to functions in `names` (the request's tools); None when it is not such a call
        (then it is plain content)."""
        head = self.prefix.strip()
        if head:
            start = reply.find(head)
            if start < 0:
                return None
            content = reply[:start].strip()
        else:  # a call is the whole reply (a code fence around it allowed, as models write one)
            reply, start, content = unfenced(reply), 0, ""
        calls, pos = [], start
        while (pos := len(reply) - len(reply[pos:].lstrip())) < len(reply):
            call, pos = self._call_at(reply, pos)
            if call is None or call["name"] not in names:
                return None
            calls.append(call)
        return (content, calls) if calls else None

    def may_become_call(self, text: str, names: set[str]) -> int:
        """How much of a reply still being written can be streamed as content: all of it once it cannot become
        a call, the words before a call's opening (and before a partial opening at its end), nothing while a
        whole-reply call may still be coming."""
        head = self.prefix.strip()
        if not head:
            rest = "" if text.lstrip().startswith("`") else text.strip()  # a code fence may hold a call: wait
            if self.name_key is not None:
                undecided = rest[:1] in ("", "{")
            else:  # a name-first call: undecided while the text is the start of a tool's name, then its arguments
                match = _NAME.match(rest)
                word = match.group() if match else ""
                after = rest[len(word):].lstrip()[:1]
                undecided = not rest or (any(n.startswith(word) for n in names) if match and not after
                                         else word in names and after == "{")
            return 0 if undecided else len(text)
        at = text.find(head)
        if at < 0:
            at = next((len(text) - n for n in range(min(len(head) - 1, len(text)), 0, -1)
                       if head.startswith(text[-n:])), len(text))
        return len(text[:at].rstrip())

    def _call_at(self, text: str, pos: int) -> tuple[dict | None, int]:
        pos = _skip(text, pos, self.prefix.strip())
        if pos < 0:
            return None, pos
        if self.name_key is None:
            match = _NAME.match(text, pos)
            if not match:
                return None, pos
            name, pos = match.group(), len(text) - len(text[match.end():].lstrip())
            arguments, pos = _json_at(text, pos)
        else:
            value, pos = _json_at(text, pos)
            if not isinstance(value, dict):
                return None, pos
            name, arguments = value.get(self.name_key), _as_arguments(value.get(self.arguments_key))
        pos = _skip(text, pos, self.suffix.strip()) if pos >= 0 else pos
        if pos < 0 or not isinstance(name, str) or not name or not isinstance(arguments, dict):
            return None, pos
        return {"name": name, "arguments": arguments}, pos


def unfenced(text: str) -> str:
    text = text.strip()
    return text.strip("`").removeprefix("json").strip() if text.startswith("```") else text


def _as_arguments(value):
    """Arguments as an object: some templates and models write them as a JSON string."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return None
    return value


def _skip(text: str, pos: int, expected: str) -> int:
    """The position after `expected` (whitespace before it allowed); -1 if it is not next."""
    pos = len(text) - len(text[pos:].lstrip())
    return pos + len(expected) if text.startswith(expected, pos) else -1


def _json_at(text: str, pos: int):
    pos = len(text) - len(text[pos:].lstrip())
    try:
        return json.JSONDecoder().raw_decode(text, pos)
    except json.JSONDecodeError:
        return None, -1


ROLES = ("system", "user", "assistant", "tool")


def validate_messages(messages: list[dict], for_training: bool = True) -> None:
    """Raises MessageError naming the message index and field when the conversation is not a list of
    chat_tools.Message in a usable order."""
    if not isinstance(messages, list) or not messages:
        raise MessageError("messages: expected a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise MessageError(f"messages[{i}]: expected an object, got {type(message).__name__}")
        if message.get("role") not in ROLES:
            raise MessageError(f"messages[{i}].role: {message.get('role')!r} is not one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise MessageError(f"messages[{i}].content: expected a string")
        calls = message.get("tool_calls")
        if calls is not None:
            if message["role"] != "assistant":
                raise MessageError(f"messages[{i}].tool_calls: only an assistant message calls functions")
            check_tool_calls(calls, i)
        # GLM-4's template skips a message whose content is empty. A system message may be empty: it then only
        # keeps a template's default system prompt out (system_prompt: ""); a call needs no words.
        if not message["content"].strip() and message["role"] != "system" and not calls:
            raise MessageError(f"messages[{i}].content: empty {message['role']} message")
    first = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
    if first is None or messages[first]["role"] != "user":
        raise MessageError("messages: the first non-system message must be a user message")
    if any(m["role"] == "system" for m in messages[first:]):
        raise MessageError("messages: system messages must come before the conversation")
    for i in range(first + 1, len(messages)):
        if messages[i]["role"] == messages[i - 1]["role"] and messages[i]["role"] == "user":
            raise MessageError(f"messages[{i}].role: two user messages in a row")
        previous = messages[i - 1]  # training, chat and serve alike:
        if messages[i]["role"] == "tool" and previous["role"] not in ("assistant", "tool"):
            raise MessageError(f"messages[{i}].role: a tool result must follow an assistant's tool call")
        if messages[i]["role"] == "tool" and previous["role"] == "assistant" and not previous.get("tool_calls"):
            raise MessageError(f"messages[{i}]: a tool result follows a plain reply, not a function call")
    if for_training and messages[-1]["role"] != "assistant":
        raise MessageError(f"messages[{len(messages) - 1}].role: a training conversation must end with the assistant")
