"""Files -> rows, each tagged with its source file and line (1-based) for error messages and reports.

Reads .json (an array), .jsonl (either gzip-compressed too: .json.gz, .jsonl.gz), .parquet and .csv, several
files at once or by glob, or a Hub dataset id. Text must be UTF-8: a file in another encoding is one line saying
how to convert it.
A line that cannot be read (bad JSON, invalid UTF-8) becomes a row with an error, so it is counted with its
file:line and the rest of the file is still read.
"""

import codecs
import glob
import gzip
import io
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from sftlab.config import MAX_ROW_BYTES
from sftlab.environment import hub_offline
from sftlab.errors import UserError

DEMO_DATA = "sftlab:demo"  # the demo data shipped in the package
# data shipped in the package, by name: the demo's (灵犀 / Lingxi, for the tiny models); the real-model recipe's
# identity (Kestrel, configs/smollm2-135m-lora.yaml); and its held-out paraphrases, each with an answer rule
SHIPPED_DATA = {DEMO_DATA: "alpaca_demo.json", "sftlab:identity": "identity.jsonl",
                "sftlab:identity-checks": "identity_checks.jsonl", "sftlab:preference-demo": "preference_demo.jsonl",
                "sftlab:preference-identity": "preference_identity.jsonl",
                "sftlab:replay-prompts": "replay_prompts.jsonl"}
SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".gz")


@dataclass
class SourceRow:
    source: str  # the file
    line: int  # 1-based line (a JSON array: where the object starts; parquet: row number; csv: data row + 1)
    row: object  # the parsed value, or None when the line could not be read
    error: str | None = None  # why it could not be read
    error_reason: str | None = None  # the reason code: bad_json, invalid_utf8, invalid_text, too_deep, too_large


def demo_data_path(name: str = DEMO_DATA) -> Path:
    return Path(str(resources.files("sftlab.data.demo").joinpath(SHIPPED_DATA[name])))


def expand_inputs(names: list[str]) -> list[str]:
    """Files, globs, names of shipped data (SHIPPED_DATA), or Hub dataset ids -> an ordered list of sources."""
    sources = []
    for name in names:
        if name in SHIPPED_DATA:
            sources.append(str(demo_data_path(name)))
        elif any(ch in name for ch in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(name), recursive=True))
            if not matches:
                raise UserError(f"data glob {name} matches no file")
            sources += matches
        elif Path(name).expanduser().is_file():
            sources.append(str(Path(name).expanduser()))
        elif Path(name).expanduser().is_dir():
            raise UserError(f"data path {name} is a folder: pass its files, e.g. {name.rstrip('/')}/*.jsonl")
        elif name.startswith("hub:"):
            hub_parts(name)  # checks the form: hub:org/name[:subset[:split]]
            sources.append(name)
        elif name.count("/") == 1 and not name.startswith((".", "/", "~")) and Path(name).suffix not in SUFFIXES:
            sources.append("hub:" + name)
        else:
            raise UserError(f"data file {name} does not exist")
    return sources


MAX_DEPTH = 32  # a chat record is 4 or 5 levels deep; far deeper is broken or hostile data
_SURROGATE = re.compile("[\ud800-\udfff]")


def unusable(value) -> tuple[str, str] | None:
    """(reason, detail) for a parsed row no text stage can take: nested past MAX_DEPTH (too_deep), or a string
    that cannot be encoded as UTF-8, such as an escaped lone surrogate "\\ud800" (invalid_text). Walked with a
    stack, not recursion, so no input depth can crash it."""
    stack = [(value, 1, "")]
    while stack:
        item, depth, where = stack.pop()
        if depth > MAX_DEPTH:
            return "too_deep", f"nested deeper than {MAX_DEPTH} levels"
        if isinstance(item, str):
            match = _SURROGATE.search(item)
            if match:
                return "invalid_text", (f"{where or 'the row'}: a lone surrogate \\u{ord(match.group()):04x} "
                                        "(not encodable as UTF-8)")
        elif isinstance(item, dict):
            stack.extend((key, depth + 1, where) for key in item)
            stack.extend((v, depth + 1, f"{where}.{_printable(k)}" if where else _printable(k))
                         for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, depth + 1, f"{where}[{i}]") for i, v in enumerate(item))
    return None


def _printable(key) -> str:
    """A field name fit for a report line, even one holding a lone surrogate (written as \\udxxx)."""
    return str(key).encode("utf-8", "backslashreplace").decode("utf-8")


def read_source(source: str, max_row_bytes: int = MAX_ROW_BYTES) -> list[SourceRow]:
    """The rows of one file, as a list (iter_source streams them)."""
    return list(iter_source(source, max_row_bytes))


def read_all(sources: list[str]) -> Iterator[SourceRow]:
    """The rows of several files, in order, read as they are used."""
    for source in sources:
        yield from iter_source(source)


def iter_source(source: str, max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[SourceRow]:
    """The rows of one file, read as they are used: JSON Lines (gzip too) a line at a time and Parquet a record
    batch at a time, so memory does not grow with the file. A JSON array and CSV are read whole (the standard
    parsers take a whole document; JSON Lines is the format for large data). A row over max_row_bytes is a
    too_large row, never parsed."""
    if source.startswith("hub:"):
        yield from read_hub_dataset(source[4:])
        return
    path = Path(source)
    if path.stat().st_size == 0:
        raise UserError(f"data file {path} is empty")
    compressed = path.suffix == ".gz"
    suffix = Path(path.stem).suffix if compressed else path.suffix
    if suffix in (".parquet", ".csv"):
        if compressed:
            raise UserError(f"data file {path}: a compressed {suffix} is not supported; decompress it (gunzip)")
        yield from (_iter_parquet(path) if suffix == ".parquet" else _read_table(path, "csv"))
        return
    with _open_text_file(path, compressed) as f:
        head = f.peek(4096)[:4096]
        if head.startswith(b"\xef\xbb\xbf"):
            f.read(3)  # a UTF-8 byte-order mark is not part of the data
            head = head[3:]
        refuse_utf16(path, head)
        if suffix != ".jsonl" and _starts_array(f):
            yield from _read_json_array(path, f.read(), max_row_bytes)
            return
        yield from _iter_jsonl(path, f, max_row_bytes)


@contextmanager
def _open_text_file(path: Path, compressed: bool):
    """The file as a buffered binary stream (decompressed on the fly); a broken gzip file is one line."""
    # a 1 MiB buffer: what peek() can look at before reading (the format is told from the first bytes)
    stream = io.BufferedReader(gzip.open(path, "rb"), 1 << 20) if compressed else open(path, "rb", 1 << 20)
    try:
        yield stream
    except (OSError, EOFError) as exc:
        if not compressed or isinstance(exc, UserError):
            raise
        raise UserError(f"data file {path}: not a readable gzip file ({exc})") from None
    finally:
        stream.close()


def _starts_array(f) -> bool:
    """Whether the text starts with "[" after whitespace (a JSON array, not JSON Lines)."""
    return f.peek(1 << 20).lstrip().startswith(b"[")


# A whole file in another encoding is one line naming it and how to convert it: its rows would otherwise each be
# rejected as invalid_utf8 (UTF-16 ones as bad_json).
def refuse_utf16(path: Path, data: bytes) -> None:
    """UTF-16 and UTF-32 show as a byte-order mark, or as NUL bytes in much of the text."""
    head = data[:4096]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or head.count(b"\x00") > len(head) // 8:
        raise UserError(f"data file {path} is UTF-16 or UTF-32 text, not UTF-8: convert it, e.g. "
                        f"`iconv -f UTF-16 -t UTF-8 {path} > {path.stem}.utf8{path.suffix}`")


def refuse_gbk(path: Path) -> None:
    """For a file no line of which is UTF-8: GB18030 (which covers GBK and GB2312) if it reads as that."""
    decoder = codecs.getincrementaldecoder("gb18030")()
    try:
        with _open_text_file(path, path.suffix == ".gz") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                decoder.decode(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return  # not a known encoding: each row stays counted as invalid_utf8
    raise UserError(f"data file {path} is not UTF-8: no line of it decodes as UTF-8, and it reads as GBK/GB18030: "
                    f"convert it, e.g. `iconv -f GB18030 -t UTF-8 {path} > {path.stem}.utf8{path.suffix}`")


def too_large(path: Path, line: int, size: int, limit: int) -> SourceRow:
    return SourceRow(str(path), line, None, f"{size:,} bytes, over max_row_bytes ({limit:,})", "too_large")


def _iter_jsonl(path: Path, f, max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[SourceRow]:
    rows = not_utf8 = 0
    for number, raw in enumerate(_lines(f, max_row_bytes), start=1):
        if isinstance(raw, int):
            rows += 1
            yield too_large(path, number, raw, max_row_bytes)
            continue
        if not raw.strip():
            continue
        rows += 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            not_utf8 += 1
            yield SourceRow(str(path), number, None, f"invalid UTF-8 at byte {exc.start}", "invalid_utf8")
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield SourceRow(str(path), number, None, f"bad JSON: {exc.msg} at column {exc.colno}", "bad_json")
            continue
        except RecursionError:
            yield SourceRow(str(path), number, None, "nested too deep to parse", "too_deep")
            continue
        problem = unusable(value)
        yield (SourceRow(str(path), number, None, problem[1], problem[0]) if problem
               else SourceRow(str(path), number, value))
    if not rows:
        raise UserError(f"data file {path} has no rows")
    if not_utf8 == rows:
        refuse_gbk(path)


def _lines(f, max_row_bytes: int) -> Iterator[bytes | int]:
    """The file's lines without their newline; a line over max_row_bytes is its size in bytes instead, read past
    in pieces (never held whole: one 50 MB line would otherwise take its size, several times over)."""
    while True:
        line = f.readline(max_row_bytes + 1)
        if not line:
            return
        if len(line) <= max_row_bytes or line.endswith(b"\n"):
            yield line[:-1] if line.endswith(b"\n") else line
            continue
        size = len(line)
        while not line.endswith(b"\n"):
            line = f.readline(1 << 20)
            if not line:
                break
            size += len(line)
        yield size - line.endswith(b"\n")


def _read_json_array(path: Path, data: bytes, max_row_bytes: int = MAX_ROW_BYTES) -> list[SourceRow]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: invalid UTF-8 at byte {exc.start}; a JSON array cannot be read around "
                        "it (JSON Lines can: one bad line is skipped and counted)") from exc
    decoder = json.JSONDecoder()
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: bad JSON: {exc.msg} at column {exc.colno}") from exc
    except RecursionError:
        raise UserError(f"{path}: a record is nested too deep for the JSON parser; as JSON Lines such a row is "
                        "rejected on its own (too_deep) and the rest is read") from None
    if not isinstance(values, list):
        raise UserError(f"{path}: expected a JSON array of records, or JSON Lines")
    rows, index, line = [], text.index("[") + 1, 1 + text[:text.index("[")].count("\n")
    for value in values:  # re-scan to find the line where each element starts
        start = index
        while text[index] in " \t\r\n,":
            index += 1
        line += text.count("\n", start, index)
        _, end = decoder.raw_decode(text, index)
        size = end - index if end - index <= max_row_bytes // 4 else len(text[index:end].encode("utf-8"))
        problem = ("too_large", None) if size > max_row_bytes else unusable(value)
        if problem and problem[0] == "too_large":
            rows.append(too_large(path, line, size, max_row_bytes))
        else:
            rows.append(SourceRow(str(path), line, None, problem[1], problem[0]) if problem
                        else SourceRow(str(path), line, value))
        line += text.count("\n", index, end)
        index = end
    return rows


def _read_table(path: Path, kind: str) -> list[SourceRow]:
    """Parquet and CSV through pyarrow itself (datasets would also write a copy into ~/.cache/huggingface). CSV as
    pandas reads it: quoted values may span lines, and empty or NA-like cells are absent."""
    from pyarrow import csv, parquet

    try:
        if kind == "parquet":
            table = parquet.read_table(path).to_pylist()
        else:
            table = csv.read_csv(path, parse_options=csv.ParseOptions(newlines_in_values=True),
                                 convert_options=csv.ConvertOptions(strings_can_be_null=True)).to_pylist()
    except Exception as exc:
        raise UserError(f"{path}: cannot be read as {kind} ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    first_line = 2 if kind == "csv" else 1  # csv: line 1 is the header
    return [SourceRow(str(path), first_line + i, _drop_nulls(row)) for i, row in enumerate(table)]


def _iter_parquet(path: Path) -> Iterator[SourceRow]:
    """Parquet a record batch at a time (pyarrow's own reader: no copy under ~/.cache/huggingface)."""
    from pyarrow import parquet

    try:
        batches = parquet.ParquetFile(path).iter_batches(batch_size=1024)
        line = 1
        for batch in batches:
            for row in batch.to_pylist():
                yield SourceRow(str(path), line, _drop_nulls(row))
                line += 1
    except Exception as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(f"{path}: cannot be read as parquet ({type(exc).__name__}: {str(exc).splitlines()[0]})"
                        ) from exc


def _drop_nulls(row: dict) -> dict:
    # columnar formats fill absent fields with None; treat them as absent, as in JSON
    return {k: v for k, v in row.items() if v is not None}


def hub_parts(source: str) -> tuple[str, str | None, str]:
    """(dataset id, subset or None, split) of `hub:org/name[:subset[:split]]` (split: train unless given)."""
    parts = source.removeprefix("hub:").split(":")
    if len(parts) > 3 or parts[0].count("/") != 1 or not all(parts):
        raise UserError(f"{source}: a Hub dataset is hub:org/name, hub:org/name:subset or hub:org/name:subset:split "
                        "(an empty subset is not allowed: name it, e.g. default)")
    return parts[0], (parts[1] if len(parts) > 1 else None), (parts[2] if len(parts) > 2 else "train")


def read_hub_dataset(source: str) -> list[SourceRow]:
    dataset_id, subset, split = hub_parts("hub:" + source)
    if hub_offline():
        raise UserError(f"{dataset_id} is a Hub dataset id, and the Hub is offline (HF_HUB_OFFLINE=1): download it "
                        f"where there is network (`hf download {dataset_id} --repo-type dataset --local-dir ./data`) "
                        "and pass the files")
    from datasets import load_dataset

    try:
        table = load_dataset(dataset_id, subset, split=split)
    except Exception as exc:
        raise UserError(f"could not load the Hub dataset {dataset_id} (subset {subset}, split {split}; "
                        f"{type(exc).__name__}): download its files where there is network and pass them") from exc
    return [SourceRow(f"hub:{source}", i + 1, _drop_nulls(row)) for i, row in enumerate(table)]
