"""One planted defect of each kind -> exactly the expected reason codes, counts and lines."""

import json

import pytest

from sftlab.chat_format import ChatRenderer, mark_supervised
from sftlab.config import CleanArguments
from sftlab.data.clean import repair_text
from sftlab.data.cleaner import clean_rows
from sftlab.data.load import SourceRow, expand_inputs, read_all, read_source
from sftlab.data.report import build_report, summary_line, write_clean_outputs
from sftlab.errors import UserError

GOOD = [
    {"instruction": "保持健康的三个提示。", "input": "", "output": "以下是保持健康的三个提示：１．多运动；２．均衡饮食！"},
    {"instruction": "Translate to English.", "input": "猫", "output": "Cat."},
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
]
# line -> (row text, expected reason); line numbers are 1-based lines of the JSONL file
PLANTED = [
    ('{"instruction": "broken", ', "bad_json"),
    ('{"instruction": "lone \\ud800 surrogate", "input": "", "output": "x"}', "invalid_text"),
    ('{"instruction": ' + "[" * 40 + "]" * 40 + ', "output": "x"}', "too_deep"),
    ('[' * 10000 + ']' * 10000, "too_deep"),
    ('{"instruction": 5, "input": "", "output": "x"}', "malformed_record"),
    ('{"instruction": "   ", "input": "", "output": "Some answer here."}', "empty_instruction"),
    ('{"instruction": "Say nothing.", "input": "", "output": ""}', "empty_response"),
    ('{"instruction": "Q", "input": "", "output": "A", "history": [["hi", ""]]}', "empty_response"),
    ('{"instruction": "Are you human?", "input": "", "output": "As an AI language model, I am not."}', "boilerplate"),
    ('{"instruction": "Give one letter.", "input": "", "output": "A"}', "short_response"),
    ('{"instruction": "Translate to English.", "input": "猫", "output": "Cat."}', "duplicate"),
    ('{"instruction": "what is the capital of  France?", "input": "", "output": "The capital of France is Paris!"}',
     "near_duplicate"),
    ('{"instruction": "Write a long essay.", "input": "", "output": "' + "word " * 400 + '"}', "too_long"),
]


@pytest.fixture
def planted_file(tmp_path):
    lines = [json.dumps(row, ensure_ascii=False) for row in GOOD] + [text for text, _ in PLANTED]
    path = tmp_path / "planted.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_clean(tokenizer, paths, max_length=256, **config):
    renderer = ChatRenderer(tokenizer, max_length=max_length)
    config = CleanArguments(**{"min_response_chars": 2, **config})
    sources = expand_inputs([str(p) for p in paths])
    return clean_rows(read_all(sources), config, renderer), sources


def test_each_planted_defect_gets_its_reason_and_line(tokenizer, planted_file):
    result, _ = run_clean(tokenizer, [planted_file])
    assert result.rows_read == len(GOOD) + len(PLANTED)
    assert len(result.kept) + len(result.rejected) == result.rows_read
    assert [k.line for k in result.kept] == [1, 2, 3]
    assert [(r.line, r.reason) for r in result.rejected] == [(len(GOOD) + 1 + i, reason)
                                                           for i, (_, reason) in enumerate(PLANTED)]
    assert result.reasons() == {"bad_json": 1, "invalid_text": 1, "too_deep": 2, "malformed_record": 1,
                                "empty_instruction": 1,
                                "empty_response": 2, "boilerplate": 1, "short_response": 1, "duplicate": 1,
                                "near_duplicate": 1, "too_long": 1}


def test_outputs_are_complete_and_deterministic(tokenizer, planted_file, tmp_path):
    def write(out):
        result, sources = run_clean(tokenizer, [planted_file])
        write_clean_outputs(out, result, build_report(result, sources, 256, "tiny"))
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}

    first, second = write(tmp_path / "a"), write(tmp_path / "b")
    assert first == second
    assert sorted(first) == ["clean.jsonl", "lengths.png", "rejected.jsonl", "report.json", "report.md"]
    report = json.loads(first["report.json"])
    assert report["rows_read"] == 16 and report["kept"] == 3 and report["rejected"] == 13
    assert report["kept"] + report["rejected"] == report["rows_read"]
    assert set(report["tokens"]) == {"prompt", "response", "total"}
    assert {"p50", "p90", "p95", "p99", "max"} <= set(report["tokens"]["total"])
    rejected = [json.loads(line) for line in first["rejected.jsonl"].decode().splitlines()]
    assert rejected[0] == {"reason": "bad_json", "source": str(planted_file), "line": 4,
                           "detail": rejected[0]["detail"], "row": None}
    assert "| too_long | 1 |" in first["report.md"].decode()
    assert report["max_length_suggestion"][0]["max_length"] == 256
    assert report["max_length_suggestion"][0]["samples_lost"] == pytest.approx(1 / 4)


def test_chinese_and_full_width_text_come_through_byte_identical(tokenizer, planted_file):
    result, _ = run_clean(tokenizer, [planted_file])
    assert result.kept[0].messages[-1]["content"] == GOOD[0]["output"]
    assert result.kept[0].messages[0]["content"] == GOOD[0]["instruction"]


def test_repairs_fix_control_characters_and_whitespace_only():
    from collections import Counter

    repairs = Counter()
    assert repair_text(" 你好，\r\n世界！\x07\u200b\u00a0ok\u3000 ", repairs) == "你好，\n世界！ ok"
    assert repairs == Counter(line_endings=1, control_characters=1, invisible_spaces=1, surrounding_whitespace=1)
    assert repair_text("全角：，。！？（）　中间", Counter()) == "全角：，。！？（）　中间"


def test_near_dedup_can_be_turned_off(tokenizer, planted_file):
    result, _ = run_clean(tokenizer, [planted_file], near_dedup=False)
    assert "near_duplicate" not in result.reasons() and len(result.kept) == 4


def test_truncate_keeps_the_long_row_with_its_terminator(tokenizer, planted_file):
    renderer = ChatRenderer(tokenizer, max_length=256, overflow="truncate")
    result = clean_rows(read_all([str(planted_file)]), CleanArguments(min_response_chars=2), renderer)
    long_row = [k for k in result.kept if k.line == len(GOOD) + len(PLANTED)][0]
    assert len(long_row.sample.input_ids) == 256 and long_row.sample.labels[-1] == tokenizer.eos_token_id


def test_strict_fails_on_the_first_malformed_row(tokenizer, planted_file):
    with pytest.raises(UserError, match=f"{planted_file}:4: bad_json"):
        run_clean(tokenizer, [planted_file], strict=True)


def test_bad_inputs_get_a_reason_or_a_clear_error(tokenizer, tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD[1]).encode() + b"\n")
    utf8 = tmp_path / "bad_utf8.jsonl"
    utf8.write_bytes(json.dumps(GOOD[2]).encode() + b"\n" + b'{"instruction": "\xff\xfe"}\n')
    huge = tmp_path / "huge.jsonl"
    huge.write_text(json.dumps({"instruction": "Q", "output": "x" * 10_000_000}) + "\n")
    result, _ = run_clean(tokenizer, [bom, utf8, huge])
    assert [k.source for k in result.kept] == [str(bom), str(utf8)]
    assert [(r.source, r.line, r.reason) for r in result.rejected] == [(str(utf8), 2, "invalid_utf8"),
                                                                        (str(huge), 1, "too_large")]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="data file .*empty.jsonl is empty"):
        run_clean(tokenizer, [empty])
    broken_array = tmp_path / "broken.json"
    broken_array.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": \n]')
    with pytest.raises(UserError, match="broken.json:4: bad JSON"):
        list(read_source(str(broken_array)))


def test_json_array_rows_carry_their_start_lines(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"instruction": "a",\n   "output": "b"},\n  {"instruction": "c", "output": "d"}\n]\n')
    assert [r.line for r in read_source(str(path))] == [2, 4]


def test_parquet_and_csv_and_globs(tmp_path, tokenizer):
    from datasets import Dataset

    Dataset.from_list(GOOD).to_parquet(str(tmp_path / "part-1.parquet"))
    Dataset.from_list(GOOD[:2]).to_csv(str(tmp_path / "part-2.csv"), index=False)
    result, sources = run_clean(tokenizer, [tmp_path / "part-*"], near_dedup=False)
    assert [s.rsplit("/", 1)[1] for s in sources] == ["part-1.parquet", "part-2.csv"]
    assert [(k.line, k.messages[-1]["content"]) for k in result.kept] == [
        (1, GOOD[0]["output"]), (2, "Cat."), (3, GOOD[2]["output"])]
    assert [(r.line, r.reason) for r in result.rejected] == [(2, "duplicate"), (3, "duplicate")]


def test_csv_is_read_as_pandas_reads_it_quoted_newlines_and_empty_cells(tmp_path):
    from sftlab.data.load import read_source

    path = tmp_path / "rows.csv"
    path.write_text('instruction,input,output\nhi,,"line one\nline two"\n"a, b",NA,ok\n', encoding="utf-8")
    rows = list(read_source(str(path)))
    assert [(r.line, r.row) for r in rows] == [(2, {"instruction": "hi", "output": "line one\nline two"}),
                                               (3, {"instruction": "a, b", "output": "ok"})]


def test_hub_dataset_id_offline_is_one_clear_error():
    with pytest.raises(UserError, match="llamafactory/alpaca_gpt4_zh is a Hub dataset id, and the Hub is offline"):
        list(read_all(expand_inputs(["llamafactory/alpaca_gpt4_zh"])))


def test_near_duplicate_decision_is_the_exact_jaccard_not_the_estimate(tmp_path):
    from sftlab.data.dedup import DedupStore
    from sftlab.data.near_dedup import MinHash

    minhash = MinHash(0.9)
    store = DedupStore(tmp_path / "dedup.sqlite", minhash)
    first = "user:who are you? assistant:i am lingxi, an ai assistant made by the sftlab team. how can i help you?"
    close = first.replace("help you?", "help you!")  # exact 5-gram Jaccard above 0.9
    farther = first.replace("who are you?", "which assistant are you?")  # 0.85: the estimate once said 0.92
    assert minhash.jaccard(first, close) >= 0.9 and minhash.jaccard(first, farther) < 0.9
    buckets = [[hash(key) for key in minhash.band_keys(s)] for s in minhash.signatures_of([first, close, farther])]
    assert set(buckets[0]) & set(buckets[2])  # an LSH candidate, which the exact similarity then turns down
    store.start_batch([], buckets[0])
    assert store.near_twin("a", first, buckets[0]) is None
    store.end_batch()
    store.commit()
    store.start_batch([], buckets[1] + buckets[2])  # a later batch: "a" comes from the file
    assert store.near_twin("b", close, buckets[1]) == "a"
    assert store.near_twin("c", farther, buckets[2]) is None
    store.close()


def test_parallel_cleaning_restores_the_environment_and_keeps_no_worker_state(tokenizer, monkeypatch):
    """The pool path (>= 4,096 rows, several cores) gives the serial path's result, leaves
    TOKENIZERS_PARALLELISM as it found it, and leaves no checker behind in this process."""
    import os

    from sftlab.data import cleaner, pool

    rows = [SourceRow("mem.jsonl", i + 1, {"instruction": f"问题 {i} 是什么？", "input": "", "output": f"答案是 {i}。"})
            for i in range(cleaner.PARALLEL_MIN_ROWS)]
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    renderer = ChatRenderer(tokenizer, 256)
    parallel = clean_rows(rows, CleanArguments(), renderer)
    assert "TOKENIZERS_PARALLELISM" not in os.environ and pool._worker_checker is None
    monkeypatch.setattr(cleaner, "PARALLEL_MIN_ROWS", 10**9)
    serial = clean_rows(rows, CleanArguments(), renderer)
    assert [k.line for k in parallel.kept] == [k.line for k in serial.kept]
    assert parallel.reasons() == serial.reasons() and len(parallel.kept) + len(parallel.rejected) == len(rows)


def test_each_row_is_read_in_its_own_format_unless_one_is_forced(tokenizer, tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！我是灵犀。"}]}] + GOOD
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    result, sources = run_clean(tokenizer, [path])
    assert len(result.kept) == 4 and result.rejected == []
    report = build_report(result, sources, 256, "tiny")
    assert report["formats"] == {str(path): {"alpaca": 3, "sharegpt": 1}}
    assert "mixed.jsonl mixes formats (alpaca 3, sharegpt 1): each row was read in its own format" in \
        summary_line(report)
    forced, _ = run_clean(tokenizer, [path], data_format="alpaca")
    assert [(r.line, r.reason, r.detail) for r in forced.rejected] == [
        (1, "mixed_format", "a sharegpt row, and data_format forces alpaca")]
    assert "mixed.jsonl mixes formats (alpaca 3, sharegpt 1): the rows not in data_format's were rejected " \
        "(mixed_format)" in summary_line(build_report(forced, sources, 256, "tiny"))


def test_bidirectional_override_characters_are_kept_and_counted():
    from collections import Counter

    repairs = Counter()
    assert repair_text("abc\u202edef", repairs) == "abc\u202edef"
    assert repairs == {"bidi_controls_kept": 1}


def glaive_row(tool_name="get_weather", city_type="string", call='{"name": "get_weather", "arguments": {"city": "Paris"}}',
               reply_before_observation=False):
    tool = {"name": tool_name, "description": "weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": city_type}}, "required": ["city"]}}
    turns = [{"from": "human", "value": "What is the weather in Paris?"}]
    turns += ([{"from": "gpt", "value": "Let me look."}] if reply_before_observation
              else [{"from": "function_call", "value": call}])
    turns += [{"from": "observation", "value": '{"weather": "sunny"}'}, {"from": "gpt", "value": "It is sunny in Paris."}]
    return {"conversations": turns, "tools": json.dumps([tool])}


def test_tool_definitions_and_calls_are_part_of_the_duplicate_key(tokenizer, tmp_path):
    rows = [glaive_row(), glaive_row(tool_name="get_forecast"), glaive_row(city_type="integer"), glaive_row(),
            glaive_row(call='{"name": "get_weather", "arguments": {"city": "Lyon"}}')]
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    result, _ = run_clean(tokenizer, [path], max_length=2048, near_dedup=False)  # GLM-4's tool preamble is long
    assert [k.line for k in result.kept] == [1, 2, 3, 5]  # other tools, another argument: kept
    assert [(r.line, r.reason, r.detail) for r in result.rejected] == [(4, "duplicate", f"same as {path}:1")]


def test_tool_results_need_a_function_call_and_calls_need_json_arguments(tokenizer, tmp_path):
    rows = [glaive_row(reply_before_observation=True),
            glaive_row(call='{"name": "get_weather", "arguments": "{city: Paris"}'),
            glaive_row(call='{"arguments": {"city": "Paris"}}'),
            glaive_row(call="get_weather(Paris)")]
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    result, _ = run_clean(tokenizer, [path], max_length=2048)
    assert [(r.line, r.reason) for r in result.rejected] == [
        (1, "role_order"), (2, "invalid_tool_call"), (3, "invalid_tool_call"), (4, "invalid_tool_call")]
    assert "a tool result follows a plain reply, not a function call" in result.rejected[0].detail
    assert "the arguments of get_weather are not valid JSON" in result.rejected[1].detail


def test_near_duplicates_are_looked_for_among_rows_with_the_same_tools_and_calls(tokenizer, tmp_path):
    def variant(**kwargs):
        row = glaive_row(**kwargs)
        row["conversations"][-1]["value"] = "It is sunny in Paris today!"  # near the base row's reply
        return row

    rows = [glaive_row(), variant(), variant(tool_name="get_forecast")]
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    result, _ = run_clean(tokenizer, [path], max_length=2048, near_dedup_threshold=0.7)
    assert [k.line for k in result.kept] == [1, 3]
    assert [(r.line, r.reason) for r in result.rejected] == [(2, "near_duplicate")]


def test_hub_datasets_take_a_subset_and_a_split():
    from sftlab.data.load import hub_parts

    assert hub_parts("hub:org/name") == ("org/name", None, "train")
    assert hub_parts("hub:org/name:zh") == ("org/name", "zh", "train")
    assert hub_parts("hub:org/name:zh:validation") == ("org/name", "zh", "validation")
    for bad in ("hub:name", "hub:org/name::train", "hub:org/name:a:b:c"):
        with pytest.raises(UserError, match="a Hub dataset is hub:org/name, hub:org/name:subset or"):
            expand_inputs([bad])
    with pytest.raises(UserError, match="org/name is a Hub dataset id, and the Hub is offline"):
        read_all(expand_inputs(["hub:org/name:zh:validation"])).__next__()


PLAIN_CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TOOL_ROWS = [
    {"instruction": "你好", "output": "你好！"},
    {"conversations": [{"from": "human", "value": "几点了？"}, {"from": "function_call",
                       "value": '{"name": "get_time", "arguments": {}}'},
                       {"from": "observation", "value": "10:00"}, {"from": "gpt", "value": "十点。"}],
     "tools": json.dumps([{"name": "get_time", "parameters": {"type": "object", "properties": {}}}])},
    {"conversations": [{"from": "human", "value": "讲个笑话。"}, {"from": "gpt", "value": "好的。"}],
     "tools": json.dumps([{"name": "get_time", "parameters": {"type": "object", "properties": {}}}])}]


def clean_tool_rows(tmp_path, **config):
    """TOOL_ROWS cleaned for a ChatML template that renders no tools (SmolLM2's)."""
    from sftlab.model.load import load_tokenizer
    from sftlab.model.tiny import ensure_tiny_model

    tokenizer = load_tokenizer(ensure_tiny_model("sftlab:tiny-qwen3"))
    tokenizer.chat_template = PLAIN_CHATML
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in TOOL_ROWS), encoding="utf-8")
    renderer = ChatRenderer(tokenizer, 1024)
    return clean_rows(read_all(expand_inputs([str(path)])), CleanArguments(**config), renderer), renderer


def test_tool_rows_on_a_template_without_tools_are_trained_in_the_fallback_form(tmp_path):
    """Every row is kept; the tools are JSON in the system message, the call a JSON reply (supervised), the
    result a user message."""
    result, renderer = clean_tool_rows(tmp_path)
    assert [k.line for k in result.kept] == [1, 2, 3] and result.rejected == []
    schema = '{"name": "get_time", "parameters": {"type": "object", "properties": {}}}'
    tools = ("You can call these functions (JSON schemas, one per line):\n" + schema + "\nTo call one, reply with "
             'only a JSON object: {"name": "<function name>", "arguments": {<arguments>}}. Its result comes back in '
             'the next message, starting with "Result of".')
    assert mark_supervised(renderer.tokenizer, result.kept[1].sample) == (
        f"<|im_start|>system\n{tools}<|im_end|>\n<|im_start|>user\n几点了？<|im_end|>\n<|im_start|>assistant\n"
        '«{"name": "get_time", "arguments": {}}<|im_end|>»\n<|im_start|>user\nResult of get_time: 10:00<|im_end|>\n'
        "<|im_start|>assistant\n«十点。<|im_end|>»\n")
    assert mark_supervised(renderer.tokenizer, result.kept[2].sample).startswith(
        f"<|im_start|>system\n{tools}<|im_end|>\n<|im_start|>user\n讲个笑话。")


def test_tool_rows_with_the_fallback_off_are_tools_unsupported_not_role_order(tmp_path):
    """tool_fallback off: the row with a call has its own reason; the row that only lists tools keeps its
    conversation without them, counted as a repair."""
    result, renderer = clean_tool_rows(tmp_path, tool_fallback=False)
    assert [k.line for k in result.kept] == [1, 3]
    assert [(r.line, r.reason, r.detail) for r in result.rejected] == [
        (2, "tools_unsupported", "the chat template renders no tools and tool_fallback is off: this row has "
                                 "function calls")]
    assert result.kept[1].messages == [{"role": "user", "content": "讲个笑话。"}, {"role": "assistant", "content": "好的。"}]
    assert result.repairs["tools_dropped"] == 1



def test_a_row_over_max_row_bytes_is_too_large_in_jsonl_and_in_a_json_array(tmp_path):
    rows = [{"instruction": "q1", "output": "short"}, {"instruction": "q2", "output": "长" * 400}]
    lines = tmp_path / "rows.jsonl"
    lines.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    for path, line in ((lines, 2), (array, 6)):
        read = read_source(str(path), max_row_bytes=1000)
        assert [r.error_reason for r in read] == [None, "too_large"] and read[1].row is None
        assert read[1].line == line and read[1].error.endswith("bytes, over max_row_bytes (1,000)")
        assert int(read[1].error.split()[0].replace(",", "")) > 1200  # 400 three-byte characters and the rest
    assert [r.error_reason for r in read_source(str(lines))] == [None, None]  # the default is 4 MiB


# VmHWM, this process image's own peak: getrusage's ru_maxrss survives exec and so would count the forking
# pytest process's peak too
HUGE_ROW_SCRIPT = """
import sys
from sftlab.cli import main
code = main(["data", "clean", sys.argv[1], "--output", sys.argv[2]])
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("PEAK_RSS_MB", peak_kb / 1024, "CODE", code)
"""


@pytest.mark.slow
def test_one_50_mb_row_is_rejected_in_bounded_memory(tmp_path):
    """A 50 MB row (17.5M characters) drove `sftlab data clean` to about 18 GB before the kernel killed it. Now it
    is too_large, counted with its line, and the process stays under 1 GB (the libraries are ~0.4 GB of it)."""
    import subprocess
    import sys

    path = tmp_path / "huge.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(5):
            f.write(json.dumps({"instruction": f"q{i}", "output": f"answer {i}"}) + "\n")
        f.write(json.dumps({"instruction": "huge", "output": "长" * 17_500_000}, ensure_ascii=False) + "\n")
        f.write(json.dumps({"instruction": "after", "output": "still read"}) + "\n")
    assert path.stat().st_size > 50_000_000
    done = subprocess.run([sys.executable, "-c", HUGE_ROW_SCRIPT, str(path), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=900)
    words = done.stdout.split("PEAK_RSS_MB")[-1].split()
    assert done.returncode == 0 and words[2] == "0", done.stderr[-2000:]
    assert float(words[0]) < 1024, words
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["reason"], r["line"]) for r in rejected] == [("too_large", 6)]
    assert len((tmp_path / "out" / "clean.jsonl").read_text().splitlines()) == 6


def test_gzip_json_lines_and_openai_text_parts_are_read(tmp_path):
    import gzip

    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello, "},
                                                       {"type": "text", "text": "who are you?"}]},
                          {"role": "assistant", "content": "A model."}]},
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                          {"role": "assistant", "content": "?"}]}]
    path = tmp_path / "chat.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    result = clean_rows(read_source(str(path)), CleanArguments(near_dedup=False), None, enabled=True)
    assert [k.messages for k in result.kept] == [[{"role": "user", "content": "Hello, who are you?"},
                                                  {"role": "assistant", "content": "A model."}]]
    assert [(r.reason, r.line) for r in result.rejected] == [("malformed_record", 2)]
    assert "expected a string or a list of text parts" in result.rejected[0].detail
