"""Duplicate counts on a generated glaive-style tool-call file, with the tool definitions in the duplicate key
(sftlab's rule) and without them (the rule before #10), side by side.

300 rows: 60 conversations, each written 5 times: (a) one tool, (b) the same call with a second tool offered,
(c) a parameter typed number instead of integer, (d) an exact copy of (a), (e) the tool described in other
words. Only (d) repeats what (a) teaches. Run: .venv/bin/python scripts/tool_dedup_counts.py [OUT.jsonl]
"""

import json
import sys
import tempfile
from pathlib import Path
from unittest import mock

from sftlab.config import CleanArguments
from sftlab.data import clean
from sftlab.data.cleaner import clean_rows
from sftlab.data.load import read_all

CITIES = ["Paris", "Lyon", "Berlin", "Madrid", "Rome", "Oslo", "Kyiv", "Lima", "Quito", "Cairo", "Delhi", "Seoul"]


def tool(name="get_forecast", days_type="integer", description="Weather forecast of a city"):
    return {"name": name, "description": description, "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": days_type}}, "required": ["city"]}}


def row(n: int, tools: list[dict]) -> dict:
    city, days = CITIES[n % len(CITIES)], 1 + n // len(CITIES)
    call = {"name": "get_forecast", "arguments": json.dumps({"city": city, "days": days})}
    return {"tools": json.dumps(tools), "conversations": [
        {"from": "human", "value": f"What will the weather be in {city} over the next {days} days?"},
        {"from": "function_call", "value": json.dumps(call)},
        {"from": "observation", "value": json.dumps({"city": city, "days": days, "forecast": "sunny"})},
        {"from": "gpt", "value": f"It will be sunny in {city} for the next {days} days."}]}


def rows() -> list[dict]:
    out = []
    for n in range(60):
        out += [row(n, [tool()]), row(n, [tool(), tool("get_time")]), row(n, [tool(days_type="number")]),
                row(n, [tool()]), row(n, [tool(description="Forecast for a city, by day")])]
    return out


def counts(path: Path) -> dict:
    result = clean_rows(read_all([str(path)]), CleanArguments(), None)
    return {"kept": len(result.kept), **result.reasons()}


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "glaive_tools.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows()), encoding="utf-8")
    with_tools = counts(path)

    real_key = clean.tool_key

    def calls_only(messages):  # the key before #10: tool definitions ignored (the calls are in the text anyway)
        return real_key([{k: v for k, v in m.items() if k != "tools"} for m in messages])

    with mock.patch.object(clean, "tool_key", calls_only):
        without_tools = counts(path)
    print(f"{path}: 300 rows, 60 conversations x 5 variants (only one variant is a true copy)")
    print("| duplicate key | kept | duplicate | near_duplicate |")
    print("| --- | ---: | ---: | ---: |")
    for name, c in (("with tool definitions (sftlab)", with_tools), ("without tool definitions", without_tools)):
        print(f"| {name} | {c['kept']} | {c.get('duplicate', 0)} | {c.get('near_duplicate', 0)} |")


if __name__ == "__main__":
    main()
