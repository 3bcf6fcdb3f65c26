"""Per-dataset options: column mapping, max_samples, mixing weights, each reported per dataset."""

import json

import pytest

from sftlab.chat_format import ChatRenderer
from sftlab.config import CleanArguments, DataArguments
from sftlab.data.prepare import prepare_data
from sftlab.data.sources import DatasetSpec, dataset_specs, read_datasets, weighted
from sftlab.errors import UserError


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def test_columns_map_a_files_own_field_names(tmp_path):
    qa = write_rows(tmp_path / "qa.jsonl", [{"question": "1+1?", "answer": "2"}])
    dialog = write_rows(tmp_path / "dialog.jsonl", [{"dialog": [{"role": "user", "content": "hi"},
                                                                {"role": "assistant", "content": "hello"}]}])
    specs = dataset_specs([{"path": qa, "columns": {"instruction": "question", "output": "answer"}},
                           json.dumps({"path": dialog, "columns": {"messages": "dialog"}})])  # the CLI's JSON form
    rows, _ = read_datasets(specs, seed=42)
    assert rows[0].row == {"instruction": "1+1?", "output": "2"}
    assert rows[1].row["messages"][1] == {"role": "assistant", "content": "hello"}
    assert (rows[0].source, rows[0].line) == (qa, 1)


def test_max_samples_draws_a_seeded_sample_and_counts_the_rest(tmp_path):
    rows = write_rows(tmp_path / "rows.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)])
    spec = [DatasetSpec(rows, max_samples=4)]
    chosen, stats = read_datasets(spec, seed=42)
    assert len(chosen) == 4 and [r.line for r in chosen] == sorted(r.line for r in chosen)
    assert [r.line for r in chosen] == [r.line for r in read_datasets(spec, seed=42)[0]]
    assert [r.line for r in chosen] != [r.line for r in read_datasets(spec, seed=7)[0]]
    assert stats == {rows: {"sources": [rows], "read": 10, "not_sampled": 6, "weight": 1.0}}


def test_weights_repeat_or_sample_training_rows():
    sources = ["a"] * 4 + ["b"] * 4
    out = weighted(list(range(8)), sources, {"a": 2.0, "b": 0.5}, seed=42)
    assert [i for i in out if i < 4] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len([i for i in out if i >= 4]) == 2 and len(set(out) & {4, 5, 6, 7}) == 2
    assert weighted(list(range(8)), sources, {"a": 1.5}, seed=42).count(0) in (1, 2)
    assert len(weighted(list(range(8)), sources, {"a": 1.5}, seed=42)) == 4 + 2 + 4


def test_mixing_is_reported_per_dataset_and_never_repeats_held_out_rows(tokenizer, tmp_path):
    small = write_rows(tmp_path / "small.jsonl", [{"instruction": f"small question {i}", "output": f"small {i}"}
                                                  for i in range(10)])
    big = write_rows(tmp_path / "big.jsonl", [{"q": f"big question number {i}", "a": f"big answer {i}"}
                                              for i in range(40)] + [{"q": "", "a": "no question"}])
    args = DataArguments(data_files=[{"path": small, "weight": 3},
                                     {"path": big, "columns": {"instruction": "q", "output": "a"}, "max_samples": 30,
                                      "weight": 0.5}], test_size=0.2)
    data = prepare_data(args, CleanArguments(near_dedup=False), ChatRenderer(tokenizer, 128))
    table = data.report["datasets"]
    assert set(table) == {small, big}
    assert table[small]["read"] == 10 and table[small]["not_sampled"] == 0 and table[small]["weight"] == 3.0
    assert table[big]["read"] == 41 and table[big]["not_sampled"] == 11
    assert table[small]["kept"] + table[big]["kept"] == data.report["kept"]
    assert table[big]["kept"] + table[big]["rejected"] == 30
    held_out = len(data.test)
    assert held_out == round(data.report["kept"] * 0.2)
    assert table[small]["train_rows"] + table[big]["train_rows"] == len(data.train)
    small_train = table[small]["kept"] - sum(r["messages"][0]["content"].startswith("small") for r in data.heldout)
    assert table[small]["train_rows"] == 3 * small_train
    assert len({r["messages"][0]["content"] for r in data.heldout}) == held_out  # no repeats
    from sftlab.data.report import render_markdown

    assert f"| {small} | 10 | 0 | 10 | 0 | 3 | {3 * small_train} |" in render_markdown(data.report)


@pytest.mark.parametrize("entry, message", [
    ({"path": "a.jsonl", "colums": {}}, r"data_files\[0\]: unknown option\(s\) colums"),
    ({"path": "a.jsonl", "columns": {"question": "q"}}, r"data_files\[0\].columns: question is not a field"),
    ({"path": "a.jsonl", "max_samples": 0}, r"data_files\[0\].max_samples: must be a positive integer"),
    ({"path": "a.jsonl", "weight": -1}, r"data_files\[0\].weight: must be a number in \(0, 100\]"),
    ({"columns": {}}, r"data_files\[0\]: expected a file name or a mapping with a path"),
    ('{"path": "a.jsonl",', r"data_files\[0\]: not valid JSON"),
])
def test_bad_dataset_options_are_one_line_naming_the_entry(entry, message):
    with pytest.raises(UserError, match=message):
        dataset_specs([entry])
