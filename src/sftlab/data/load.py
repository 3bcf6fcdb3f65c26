"""Files -> records, each tagged with its source file and line (1-based) for error messages and reports."""

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from sftlab.errors import UserError

DEMO_DATA = "sftlab:demo"  # the demo data shipped in the package


@dataclass
class SourceRow:
    source: str  # the file
    line: int  # 1-based line in the file (for a JSON array: the line where the object starts)
    row: object  # the parsed JSON value, or None when the line could not be parsed
    error: str | None = None  # why the line could not be parsed


def demo_data_path() -> Path:
    return Path(str(resources.files("sftlab.data.demo").joinpath("alpaca_demo.json")))


def resolve_data_file(name: str) -> Path:
    if name == DEMO_DATA:
        return demo_data_path()
    path = Path(name).expanduser()
    if not path.is_file():
        raise UserError(f"data file {name} does not exist")
    return path


def read_rows(path: Path) -> list[SourceRow]:
    """Reads a .json array or a .jsonl file. A bad JSONL line becomes a SourceRow with an error, not a crash."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a leading BOM is not part of the data
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})")
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        return _read_jsonl(path, text)
    return _read_json_array(path, text)


def _read_jsonl(path: Path, text: str) -> list[SourceRow]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(SourceRow(str(path), number, json.loads(line)))
        except json.JSONDecodeError as exc:
            rows.append(SourceRow(str(path), number, None, f"bad JSON: {exc.msg} at column {exc.colno}"))
    return rows


def _read_json_array(path: Path, text: str) -> list[SourceRow]:
    decoder = json.JSONDecoder()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: bad JSON: {exc.msg} at column {exc.colno}")
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of records or JSON Lines")
    # recover each element's start line by re-scanning the array element by element
    rows, index, line_starts = [], text.index("[") + 1, _line_starts(text)
    for value in data:
        while text[index] in " \t\r\n,":
            index += 1
        _, end = decoder.raw_decode(text, index)
        rows.append(SourceRow(str(path), _line_of(line_starts, index), value))
        index = end
    return rows


def _line_starts(text: str) -> list[int]:
    starts = [0]
    starts += [i + 1 for i, ch in enumerate(text) if ch == "\n"]
    return starts


def _line_of(line_starts: list[int], offset: int) -> int:
    import bisect

    return bisect.bisect_right(line_starts, offset)
