"""An Ollama Modelfile for an exported GGUF: a TEMPLATE (Go's text/template, as Ollama renders it) that writes
exactly what the model's own chat template writes, learned from that template rather than written per family.

The chat template is rendered on a conversation of markers, with and without a system message; the text between
the markers is the constant text each role puts around its content (its header before, its end after), the
prefix before the first message and the generation prompt after the last. The Go template writes those
constants as quoted strings (never as literal template text, whose whitespace Go's trim markers could eat).
Ollama puts the Modelfile's SYSTEM before a conversation without a system message, which is how a template's
default system prompt (SmolLM2's) is kept. Function calls and tool results are not rendered by this TEMPLATE
(sftlab serve renders them with the chat template itself).
"""

import json
from dataclasses import dataclass

from sftlab.chat_format import ChatRenderer
from sftlab.errors import UserError

MARK = {"system": "SFTLABSYSTEMMARK", "user": "SFTLABUSERMARK", "assistant": "SFTLABASSISTANTMARK",
        "user2": "SFTLABUSERTWOMARK"}


@dataclass(frozen=True)
class TurnText:
    """The constant text of a chat template around each message's content."""

    prefix: str  # before the first message when there is no system message
    system_before: str
    system_after: str
    user_before: str
    user_after: str
    assistant_before: str  # an assistant turn in the history, as the template writes it there
    assistant_after: str
    generation: str  # the generation prompt
    system_always: bool  # the template writes its system block with or without a system message (Llama-3.1)


def common_suffix(*texts: str) -> str:
    n = 0
    while all(len(t) > n for t in texts) and len({t[len(t) - n - 1] for t in texts}) == 1:
        n += 1
    return texts[0][len(texts[0]) - n:] if n else ""


def learn_turns(renderer: ChatRenderer) -> TurnText:
    """The template's constant text, from three renderings; a UserError when the template does not write a
    conversation as content between constant text (then no Go template can reproduce it)."""
    def render(messages, generation=True):
        return renderer.render_text([{"role": r.rstrip("2"), "content": MARK[r]} for r in messages],
                                    add_generation_prompt=generation)

    def cut(text: str, roles) -> list[str]:
        pieces = []
        for role in roles:
            if MARK[role] not in text:
                raise UserError("the chat template does not write messages as they are (a message's content is "
                                "changed or left out), so no Ollama TEMPLATE can reproduce it")
            before, text = text.split(MARK[role], 1)
            pieces.append(before)
        return [*pieces, text]

    alone, alone_open = render(["user"], False), render(["user"])
    if not alone_open.startswith(alone):
        raise UserError("the chat template's generation prompt is not appended to the conversation")
    generation = alone_open[len(alone):]
    c0, c1, c2, c3 = cut(render(["user", "assistant", "user2"]), ["user", "assistant", "user2"])
    roles = ["system", "user", "assistant", "user2"]
    d0, d1, d2, _, _ = cut(render(roles), roles)
    if not c3.endswith(generation):
        raise UserError("the chat template writes a conversation's end differently from its generation prompt")
    user_after = c3[:len(c3) - len(generation)]
    if not c1.startswith(user_after) or not d2.startswith(user_after):
        raise UserError("the chat template ends a user's turn in more than one way")
    user_before = common_suffix(c0, c2, d1)
    prefix, system_after = c0[:len(c0) - len(user_before)], d1[:len(d1) - len(user_before)]
    return TurnText(
        prefix=prefix, system_before=d0, system_after=system_after, user_before=user_before, user_after=user_after,
        assistant_before=c1[len(user_after):], assistant_after=c2[:len(c2) - len(user_before)], generation=generation,
        system_always=prefix == d0 + system_after)


def go_string(text: str) -> str:
    """`text` as a Go string literal inside an action: {{ "..." }} prints it as it is."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def go_template(turns: TurnText) -> str:
    """The Ollama TEMPLATE: system first (the template's block, written always where the template always writes
    it), then each user and assistant message, then the generation prompt unless the last message is the
    assistant's (a reply to continue)."""
    system = ('{{- $system := "" }}{{- $has := false }}{{- range .Messages }}{{- if eq .Role "system" }}'
              "{{- $system = .Content }}{{- $has = true }}{{- end }}{{- end }}")
    if turns.system_always:
        opening = go_string(turns.system_before) + "{{ $system }}" + go_string(turns.system_after)
    else:
        opening = ("{{- if $has }}" + go_string(turns.system_before) + "{{ $system }}" + go_string(turns.system_after)
                   + "{{- else }}" + go_string(turns.prefix) + "{{- end }}")
    messages = ('{{- $last := "" }}{{- range .Messages }}{{- if eq .Role "user" }}'
                + go_string(turns.user_before) + "{{ .Content }}" + go_string(turns.user_after)
                + '{{- else if eq .Role "assistant" }}'
                + go_string(turns.assistant_before) + "{{ .Content }}" + go_string(turns.assistant_after)
                + "{{- end }}{{- $last = .Role }}{{- end }}")
    return system + opening + messages + '{{- if ne $last "assistant" }}' + go_string(turns.generation) + "{{- end }}"


def triple_quoted(text: str) -> str:
    """A Modelfile value as Ollama reads it whole: between triple quotes, newlines and quotes as they are."""
    if '"""' in text or text.endswith('"'):
        raise UserError('a Modelfile value cannot hold three quotes in a row or end with a quote')
    return f'"""{text}"""'


def modelfile(renderer: ChatRenderer, gguf_name: str, stop_tokens: list[str]) -> str:
    """The Modelfile beside `gguf_name`: FROM, the TEMPLATE, the template's default system prompt as SYSTEM,
    and a stop parameter per stop token."""
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {triple_quoted(go_template(learn_turns(renderer)))}"]
    if renderer.default_system:
        lines.append(f"SYSTEM {triple_quoted(renderer.default_system)}")
    lines += [f"PARAMETER stop {json.dumps(token, ensure_ascii=False)}" for token in stop_tokens]
    return "\n".join(lines) + "\n"
