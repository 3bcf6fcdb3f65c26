import json
import os
import shutil
from pathlib import Path

import pytest

from sftlab.chat_format import ChatRenderer
from sftlab.config import CleanArguments, DataArguments
from sftlab.data import prepare
from sftlab.data.prepare import prepare_data, split_indices


def test_split_is_seeded_and_disjoint():
    train, test = split_indices(100, 0.05, seed=42)
    again = split_indices(100, 0.05, seed=42)
    assert train.tolist() == again[0].tolist() and test.tolist() == again[1].tolist()
    assert len(test) == 5 and not set(train.tolist()) & set(test.tolist()) and len(train) + len(test) == 100
    assert split_indices(100, 0.05, seed=7)[1].tolist() != test.tolist()
    # the draw of random.shuffle on a list, which the split drew before it took index arrays
    order = list(range(100))
    import random
    random.Random(42).shuffle(order)
    assert test.tolist() == sorted(order[:5])


def test_prepared_data_is_cached_under_a_content_hash(tokenizer, tmp_path, monkeypatch):
    data_file = tmp_path / "rows.jsonl"
    data_file.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"answer number {i}"}) + "\n"
                                 for i in range(20)))
    renderer = ChatRenderer(tokenizer, 64)
    args = DataArguments(data_files=[str(data_file)], test_size=0.1)
    first = prepare_data(args, CleanArguments(), renderer)
    monkeypatch.setattr(prepare, "build", lambda *a, **k: pytest.fail("the cache was not used"))
    again = prepare_data(args, CleanArguments(), renderer)
    assert again.fingerprint == first.fingerprint and again.report == first.report
    assert again.train.to_dict() == first.train.to_dict() and again.heldout == first.heldout
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


@pytest.mark.parametrize("damage", ["truncated", "zero_bytes", "missing"])
def test_a_damaged_cache_entry_is_rebuilt_with_a_line(tokenizer, tmp_path, capsys, damage):
    data_file = tmp_path / "rows.jsonl"
    data_file.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"reply {i} " * 5}) + "\n"
                                 for i in range(30)))
    renderer = ChatRenderer(tokenizer, 64)
    args = DataArguments(data_files=[str(data_file)], test_size=0.1)
    first = prepare_data(args, CleanArguments(), renderer)
    arrow, expected = first.train.cache_files[0]["filename"], first.train.to_dict()
    del first  # memory-mapped: reading it after the damage below would be a bus error
    size = Path(arrow).stat().st_size
    if damage == "missing":
        Path(arrow).unlink()
    else:
        Path(arrow).write_bytes(Path(arrow).read_bytes()[:size // 2] if damage == "truncated" else b"")
    capsys.readouterr()
    again = prepare_data(args, CleanArguments(), renderer)
    shown = {"truncated": f"{size // 2} bytes", "zero_bytes": "0 bytes", "missing": "no file"}[damage]
    assert (f"prepared-data cache {Path(arrow).parents[1]} is damaged (shards/{Path(arrow).name}: {shown}, {size} bytes "
            "were written): removing it and preparing the data again") in capsys.readouterr().out
    assert again.train.to_dict() == expected and Path(arrow).stat().st_size == size


def test_a_killed_preparations_staging_folder_is_removed_by_the_next_one(tokenizer, tmp_path, capsys):
    import subprocess
    import sys

    from sftlab.environment import cache_root

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    datasets = cache_root() / "datasets"
    stale = datasets / f".0123abcd-staging-{ended.stdout.strip()}-x1y2"
    live = datasets / f".4567cdef-staging-{os.getpid()}-z3w4"  # this process: still being written
    for folder in (stale, live):
        (folder / "train").mkdir(parents=True)
    data_file = tmp_path / "rows.jsonl"
    data_file.write_text("".join(json.dumps({"instruction": f"w{i}", "output": f"words {i} " * 4}) + "\n"
                                 for i in range(10)))
    prepare_data(DataArguments(data_files=[str(data_file)], test_size=0.1), CleanArguments(), ChatRenderer(tokenizer, 64))
    assert f"removing {stale}: left by an interrupted run (PID {ended.stdout.strip()} has ended)" in capsys.readouterr().out
    assert not stale.exists() and live.exists()
    shutil.rmtree(live)
