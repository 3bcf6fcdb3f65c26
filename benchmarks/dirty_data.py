"""Planted defects for generated data: real instruction data holds broken lines, empty and boilerplate replies,
malformed records and duplicates, so every benchmark's data (and the tests' large files) holds them too.

    from dirty_data import with_defects
    lines = with_defects(rows, max_length=1024)  # JSON Lines, as bytes: some are not valid UTF-8 or JSON

    .venv/bin/python benchmarks/dirty_data.py --rows 50000 [--every_reason] OUT.jsonl

`rows` are clean Alpaca rows (instruction/input/output); the result keeps them in order and inserts, at seeded
positions, rows that sftlab rejects, each of every kind at least once. `AUTO_REASONS` are the reasons a file read
with --data_format auto and the default cleaning settings can have; `format="sharegpt"` writes every row as a
ShareGPT conversation, so that with --data_format sharegpt an Alpaca row is a `mixed_format` one, and
`short_response` and `too_large` are planted when asked for (they need min_response_chars above 1 and
max_row_bytes 65536).
"""

import argparse
import json
import random

AUTO_REASONS = ("bad_json", "invalid_utf8", "invalid_text", "too_deep", "malformed_record", "invalid_tool_call",
                "empty_instruction", "empty_response", "role_order", "boilerplate", "duplicate", "near_duplicate",
                "too_long")
# with --data_format sharegpt, --min_response_chars 2 and --max_row_bytes 65536 (a 4 MiB row in every file would
# make each benchmark's data needlessly large)
EVERY_REASON = AUTO_REASONS + ("mixed_format", "short_response", "too_large")
TOO_LARGE_BYTES = 70_000


def as_format(row: dict, fmt: str) -> dict:
    if fmt == "alpaca":
        return row
    prompt = row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")
    return {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": row["output"]}]}


def line(row, ascii_only: bool = False) -> bytes:
    return json.dumps(row, ensure_ascii=ascii_only).encode("utf-8")


def sharegpt(*turns) -> dict:
    return {"conversations": [{"from": who, "value": value} for who, value in turns]}


def planted(reason: str, rng: random.Random, rows: list[dict], written: int, fmt: str, max_length: int) -> bytes:
    """One line that sftlab rejects for `reason`, made from the clean rows already written (rows[:written])."""
    base = dict(rows[rng.randrange(written)])
    tag = rng.randrange(10**9)  # keeps planted rows from being duplicates of each other
    if reason == "bad_json":
        text = line(as_format(base, fmt)).decode("utf-8")
        return text[:len(text) // 2].encode("utf-8")  # cut between characters: valid UTF-8, broken JSON
    if reason == "invalid_utf8":
        return line(as_format({**base, "instruction": f"{tag} @@"}, fmt)).replace(b"@@", b"\xff\xfe", 1)
    if reason == "invalid_text":  # an escaped lone surrogate: valid JSON, not encodable text
        return line(as_format({**base, "instruction": f"{tag} \ud800"}, fmt), ascii_only=True)
    if reason == "too_deep":
        return b'{"instruction": ' + b"[" * 64 + b"]" * 64 + b', "output": "x"}'
    if reason == "malformed_record":
        return line({"instruction": tag, "input": "", "output": base["output"]} if fmt == "alpaca"
                    else {"conversations": [{"from": "human", "value": tag}, {"from": "gpt", "value": "x"}]})
    if reason == "mixed_format":
        return line(base)  # an Alpaca row in a file forced to be ShareGPT
    if reason == "invalid_tool_call":
        return line({**sharegpt(("human", f"{tag}: {base['instruction']}"), ("function_call", "{get_weather(")),
                     "tools": [{"name": "get_weather", "parameters": {"type": "object"}}]})
    if reason == "empty_instruction":
        return line(as_format({**base, "instruction": "  ", "input": ""}, fmt))
    if reason == "empty_response":
        return line(as_format({**base, "output": ""}, fmt))
    if reason == "role_order":  # the reply before the question
        return line(sharegpt(("gpt", f"{tag} {base['output']}"), ("human", base["instruction"])))
    if reason == "boilerplate":
        refusal = rng.choice(["作为一个AI语言模型，我无法回答这个问题。", "As an AI language model, I cannot do that."])
        return line(as_format({**base, "output": f"{refusal} {tag}"}, fmt))
    if reason == "short_response":
        return line(as_format({**base, "instruction": f"{tag} {base['instruction']}", "output": "好"}, fmt))
    if reason == "duplicate":
        return line(as_format(base, fmt))
    if reason == "near_duplicate":  # one character added to a long reply: 5-gram Jaccard well above 0.9
        long_row = max((rows[rng.randrange(written)] for _ in range(20)), key=lambda r: len(r["output"]))
        return line(as_format({**long_row, "output": long_row["output"] + "！"}, fmt))
    if reason == "too_large":  # over --max_row_bytes 65536: rejected before it is parsed
        return line(as_format({**base, "output": f"{tag} " + "x" * TOO_LARGE_BYTES}, fmt))
    if reason == "too_long":  # several times max_length in characters: over it in tokens with any tokenizer
        return line(as_format({**base, "output": f"{tag} " + "长文本" * max_length}, fmt))
    raise ValueError(f"no planted row for {reason!r}")


def with_defects(rows: list[dict], max_length: int = 1024, seed: int = 0, reasons=AUTO_REASONS,
                 share: float = 0.015, fmt: str = "alpaca") -> list[bytes]:
    """The rows as JSON Lines (bytes) in `fmt`, with about `share` of them planted defects spread over the file,
    each reason at least once. The first defects come after a few clean rows (duplicates need an earlier row)."""
    rng = random.Random(seed)
    total = max(len(reasons), round(len(rows) * share))
    kinds = list(reasons) + [rng.choice(reasons) for _ in range(total - len(reasons))]
    rng.shuffle(kinds)
    start = min(len(rows), 10)
    positions = sorted(rng.randrange(start, len(rows) + 1) for _ in kinds)
    out, written, planted_at = [], 0, iter(zip(positions, kinds))
    pending = next(planted_at, None)
    for i, row in enumerate(rows):
        while pending is not None and pending[0] == i:
            out.append(planted(pending[1], rng, rows, max(written, 1), fmt, max_length))
            pending = next(planted_at, None)
        out.append(line(as_format(row, fmt)))
        written += 1
    while pending is not None:
        out.append(planted(pending[1], rng, rows, len(rows), fmt, max_length))
        pending = next(planted_at, None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Write generated Alpaca-like rows with planted defects.")
    parser.add_argument("output")
    parser.add_argument("--rows", type=int, default=50_000, help="generated clean rows (defects come on top)")
    parser.add_argument("--max_length", type=int, default=1024, help="the too_long rows are over this")
    parser.add_argument("--every_reason", action="store_true",
                        help="ShareGPT rows and every reason: clean with --data_format sharegpt --min_response_chars 2 "
                        "--max_row_bytes 65536")
    args = parser.parse_args()
    from data_pipeline import make_rows

    lines = (with_defects(make_rows(args.rows), args.max_length, reasons=EVERY_REASON, fmt="sharegpt")
             if args.every_reason else with_defects(make_rows(args.rows), args.max_length))
    with open(args.output, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    print(f"wrote {args.output}: {len(lines)} rows, {len(lines) - args.rows} planted defects")


if __name__ == "__main__":
    main()
