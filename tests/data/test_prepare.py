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
    assert prepare_data(args, CleanArguments(), renderer) == first
    monkeypatch.undo()
    data_file.write_text(data_file.read_text() + json.dumps({"instruction": "new", "output": "row here"}) + "\n")
    changed = prepare_data(args, CleanArguments(), renderer)  # new content, new key: prepared again
    assert changed.report["rows_read"] == 21
    assert len(changed.train) + len(changed.test) == 21 and len(first.train) + len(first.test) == 20
