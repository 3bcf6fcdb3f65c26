"""Property test: whatever a line of a data file holds (valid rows, broken JSON, wrong types, unicode edge cases
such as lone surrogates and bidi controls, deep nesting), cleaning neither crashes nor loses a row: kept +
rejected == rows read, and two runs give identical results, in this process and in worker processes alike."""

import json
import tempfile
from pathlib import Path
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftlab.chat_format import ChatRenderer
from sftlab.config import CleanArguments
from sftlab.data import cleaner
from sftlab.data.cleaner import clean_rows
from sftlab.data.load import expand_inputs, read_all
from sftlab.data.report import build_report

# any code point, surrogates and controls included (json.dumps writes a lone surrogate as an escape)
ANY_TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()), max_size=40)
EDGE_TEXT = st.sampled_from(["", "   ", "\u202e evil", "\ud800", "a\r\nb", "\u200b", "你好，世界！", "\x00\x07", "𝔘"])
TEXT = st.one_of(ANY_TEXT, EDGE_TEXT)
JUNK = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), TEXT),
                    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
                    max_leaves=8)
ALPACA = st.fixed_dictionaries({"instruction": TEXT, "output": TEXT}, optional={"input": TEXT, "system": JUNK})
SHAREGPT = st.fixed_dictionaries({"conversations": st.lists(st.fixed_dictionaries(
    {"from": st.sampled_from(["human", "gpt", "system", "observation", "function_call", "alien"]), "value": TEXT}),
    max_size=4)})
MESSAGES = st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", 7]), "content": JUNK}), max_size=4)})


def nested(depth: int) -> str:
    return '{"instruction": ' + "[" * depth + "]" * depth + ', "output": "x"}'


LINE = st.one_of(
    st.one_of(ALPACA, SHAREGPT, MESSAGES, JUNK).map(lambda row: json.dumps(row)),  # ASCII escapes: always one line
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\n\r"), max_size=30),  # not JSON
    st.integers(min_value=30, max_value=3000).map(nested),
)


def clean_file(path: Path, tokenizer, num_proc: int = 1) -> tuple:
    sources = expand_inputs([str(path)])
    result = clean_rows(read_all(sources), CleanArguments(num_proc=num_proc), ChatRenderer(tokenizer, 128))
    report = build_report(result, sources, 128, "tiny")
    outcome = ([(k.line, k.sample.input_ids) for k in result.kept], [(r.line, r.reason) for r in result.rejected])
    return result, report, outcome


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(LINE, min_size=1, max_size=12))
def test_cleaning_never_crashes_nor_loses_a_row(tokenizer, lines):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        non_blank = sum(1 for line in lines if line.strip())
        if non_blank == 0:
            return  # an empty file is one clear error, tested elsewhere
        result, report, outcome = clean_file(path, tokenizer)
        assert result.rows_read == non_blank == len(result.kept) + len(result.rejected)
        assert report["kept"] + report["rejected"] == report["rows_read"]
        json.dumps(report, ensure_ascii=False).encode("utf-8")  # every detail is writable as UTF-8
        again = clean_file(path, tokenizer)
        assert again[2] == outcome and again[1] == report
        with mock.patch.object(cleaner, "BATCH_ROWS", 3):  # several batches: the worker pool's path
            pooled = clean_file(path, tokenizer, num_proc=2)
        assert pooled[2] == outcome and pooled[1] == report
