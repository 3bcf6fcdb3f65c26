"""Writing files so that a crash never leaves a half-written one that looks complete."""

import json
import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Writes to a temporary name beside `path`, then renames it over `path` (atomic on one filesystem)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def append_jsonl(path: Path, records: list[dict]) -> None:
    """Appends whole lines: a crash loses at most the line being written, never earlier ones."""
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
