"""Row transforms: a source row (alpaca, ...) -> a list of chat messages.

Each transform raises FieldError naming the field that is wrong; the loader adds the file and line.
"""


class FieldError(ValueError):
    """A row whose field is missing or of the wrong type."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field!r}: {problem}")
        self.field = field


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
    if not isinstance(row, dict):
        raise FieldError("<row>", f"expected a JSON object, got {type(row).__name__}")
    instruction, input_, output = _text(row, "instruction"), _text(row, "input", False), _text(row, "output")
    system = _text(row, "system", False) or system_prompt
    messages = [{"role": "system", "content": system}] if system else []
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
