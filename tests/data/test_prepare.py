import json

import pytest

from sftlab.chat_format import ChatRenderer
from sftlab.config import CleanArguments, DataArguments
from sftlab.data import prepare
from sftlab.data.prepare import prepare_data, split_indices


def test_split_is_seeded_and_disjoint():
    train, test = split_indices(100, 0.05, seed=42)
    assert (train, test) == split_indices(100, 0.05, seed=42)
    assert len(test) == 5 and not set(train) & set(test) and len(train) + len(test) == 100
    assert split_indices(100, 0.05, seed=7)[1] != test


def test_prepared_data_is_cached_under_a_content_hash(tokenizer, tmp_path, monkeypatch):
    data_file = tmp_path / "rows.jsonl"
    data_file.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"answer number {i}"}) + "\n"
                                 for i in range(20)))
    renderer = ChatRenderer(tokenizer, 64)
    args = DataArguments(data_files=[str(data_file)], test_size=0.1)
    first = prepare_data(args, CleanArguments(), renderer)
    monkeypatch.setattr(prepare, "clean_rows", lambda *a, **k: pytest.fail("the cache was not used"))
    again = prepare_data(args, CleanArguments(), renderer)
    assert again.fingerprint == first.fingerprint and again.report == first.report
    assert again.train.to_dict() == first.train.to_dict() and again.test_messages == first.test_messages
    monkeypatch.undo()
    # Arrow files on disk, read memory-mapped: the token ids are not held in Python objects
    assert again.train.cache_files and again.train.column_names == ["input_ids", "labels", "length", "num_supervised"]
    row = again.train[0]
    assert row["length"] == len(row["input_ids"]) and row["num_supervised"] == sum(x != -100 for x in row["labels"])
    data_file.write_text(data_file.read_text() + json.dumps({"instruction": "new", "output": "row here"}) + "\n")
    changed = prepare_data(args, CleanArguments(), renderer)  # new content, new key: prepared again
    assert changed.report["rows_read"] == 21
    assert len(changed.train) + len(changed.test) == 21 and len(first.train) + len(first.test) == 20


def test_an_empty_held_out_split_is_cached_too(tokenizer, tmp_path):
    data_file = tmp_path / "one.jsonl"
    data_file.write_text(json.dumps({"instruction": "q", "output": "the only answer"}) + "\n")
    args = DataArguments(data_files=[str(data_file)], test_size=0.1)
    renderer = ChatRenderer(tokenizer, 64)
    first = prepare_data(args, CleanArguments(), renderer)
    again = prepare_data(args, CleanArguments(), renderer)
    assert (len(first.train), len(first.test)) == (len(again.train), len(again.test)) == (1, 0)
